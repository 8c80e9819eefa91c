_base_ = './fpn_dat-t++_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.4,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
