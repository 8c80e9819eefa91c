_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
          './_base_/dat-pp_coco.py']

model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', drop_path_rate=0.0, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
train_dataloader = dict(dataset=dict(pipeline=_base_.ms_crop_mask_pipeline))
optim_wrapper = dict(optimizer=dict(lr=4e-4))
