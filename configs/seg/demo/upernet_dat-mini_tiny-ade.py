# The demo segmentor: a small DAT++ UperNet on data/tiny/ade (tools/make_tiny_dataset.py), a few minutes
# on a CPU.
_base_ = ['mmseg::_base_/models/upernet_swin.py', 'mmseg::_base_/default_runtime.py', '../../_base_/dat.py',
          '../../_base_/dat_mini.py']

crop_size = (128, 128)
classes = ('background', 'square', 'circle', 'triangle')
norm_cfg = dict(type='BN', requires_grad=True)   # SyncBN needs a process group; one CPU has none
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch=_base_.dat_mini),
    decode_head=dict(in_channels=[24, 48, 96, 192], channels=64, num_classes=len(classes), norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=96, channels=32, num_classes=len(classes), norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
dataset = dict(type='BaseSegDataset', data_root='data/tiny/ade', metainfo=dict(classes=classes),
               img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(batch_size=4, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True), dataset=dict(
    **dataset, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
    pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False), dataset=dict(
    **dataset, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
    pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 160
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
                     paramwise_cfg=_base_.dat_paramwise_cfg)
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
                   dict(type='PolyLR', eta_min=0.0, power=1.0, begin=20, end=max_iters, by_epoch=False)]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=40, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
