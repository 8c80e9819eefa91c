_base_ = './fpn_dat-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint='checkpoints/dat_base_in1k_224.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
