# DAT (v1) with the Swin recipe the paper followed: single-scale 1x.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
          './_base_/dat_coco.py']

model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny', deform_strides=_base_.dat_v1_deform_strides,
                  drop_path_rate=0.2, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_tiny_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
