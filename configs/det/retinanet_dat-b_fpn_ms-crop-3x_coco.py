_base_ = './retinanet_dat-t_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint='checkpoints/dat_base_in1k_224.pth')),
    neck=dict(in_channels=[256, 512, 1024]))
