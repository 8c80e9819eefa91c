_base_ = './retinanet_dat-t++_fpn_ms-crop-1x_coco.py'

model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.1,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    neck=dict(in_channels=[192, 384, 768]))
