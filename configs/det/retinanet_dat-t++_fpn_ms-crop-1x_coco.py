_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', 'mmdet::_base_/datasets/coco_detection.py',
          './_base_/dat-pp_coco.py']

model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', out_indices=(1, 2, 3), drop_path_rate=0.0,
                  with_cp=True, init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    # The authors' FPN with start_level=1 over four stages, written over the three stages it reads: P3-P7.
    neck=dict(in_channels=[128, 256, 512], start_level=0, add_extra_convs='on_input', num_outs=5))
train_dataloader = dict(dataset=dict(pipeline=_base_.ms_crop_box_pipeline))
optim_wrapper = dict(optimizer=dict(lr=2e-4))
