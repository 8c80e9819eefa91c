# The demo detector: a small DAT++ Mask R-CNN on data/tiny/coco (tools/make_tiny_dataset.py), a few
# minutes on a CPU. Iteration-based so that a stop and a resume land on checkpoint boundaries.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
          'mmdet::_base_/default_runtime.py', '../../_base_/dat.py', '../../_base_/dat_mini.py']

data_root = 'data/tiny/coco/'
classes = ('square', 'circle', 'triangle')
width = 64   # neck and head width, down from 256
model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch=_base_.dat_mini),
    neck=dict(in_channels=[24, 48, 96, 192], out_channels=width),
    # Objects are 10-50 px: anchors of 16-256 px instead of COCO's 32-512.
    rpn_head=dict(in_channels=width, feat_channels=width, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, num_classes=len(classes))),
    # A few objects per image: smaller, balanced samples give the heads positives to learn from early.
    train_cfg=dict(rpn=dict(sampler=dict(num=64)), rcnn=dict(sampler=dict(num=64, pos_fraction=0.5))))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=(128, 128), ratio_range=(0.8, 1.25), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
dataset = dict(data_root=data_root, metainfo=dict(classes=classes))
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(
    **dataset, ann_file='train.json', data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(
    **dataset, ann_file='val.json', data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

max_iters = 400
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05), paramwise_cfg=_base_.dat_paramwise_cfg,
                     clip_grad=dict(max_norm=10.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=40),
                   dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[340], gamma=0.1)]
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(by_epoch=False, interval=50, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
