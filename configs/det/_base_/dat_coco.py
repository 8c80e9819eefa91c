# What every DAT detector shares: the backbone package, AdamW without decay on norms and bias tables, and
# the Swin detection schedule (lr 1e-4, 1000-iteration warm-up, steps at 8/11 of 12 epochs, batch 16 =
# 8 GPUs x 2 images) that the DAT v1 paper followed. DAT++ changes it in dat-pp_coco.py.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py', '../../_base_/dat.py']

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # Norm layers are also found by type (the Cascade heads' SyncBN is named 'bn'); biases keep their decay.
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys=_base_.dat_paramwise_cfg.custom_keys))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)]
auto_scale_lr = dict(enable=False, base_batch_size=16)

# The DETR-style multi-scale + crop augmentation of the Swin / DAT "ms-crop" recipes.
_short_sides = [(s, 1333) for s in range(480, 801, 32)]
ms_crop = dict(type='RandomChoice', transforms=[
    [dict(type='RandomChoiceResize', scales=_short_sides, keep_ratio=True)],
    [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
     dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
     dict(type='RandomChoiceResize', scales=_short_sides, keep_ratio=True)]])
ms_crop_box_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5), ms_crop, dict(type='PackDetInputs')]
ms_crop_mask_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5), ms_crop, dict(type='PackDetInputs')]

# 36 epochs with steps at 27 and 33: assigned to param_scheduler by the 3x configs.
schedule_3x = [param_scheduler[0],
               dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1)]

# Cascade heads of the Swin / DAT++ Cascade Mask R-CNN recipe: 4 shared convs + 1 fc, SyncBN, GIoU loss on
# decoded boxes; the three stages differ only in their box-delta scales.
cascade_bbox_heads = [
    dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
         fc_out_channels=1024, roi_feat_size=7, num_classes=80, reg_class_agnostic=False, reg_decoded_bbox=True,
         norm_cfg=dict(type='SyncBN', requires_grad=True),
         bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
         loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
         loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
    for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])]
