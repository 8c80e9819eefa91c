_base_ = './dino-5scale_dat-t++_8xb2-12e_coco.py'

model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.1,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
