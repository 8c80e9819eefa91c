_base_ = './fpn_dat-t++_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='tiny', deform_strides=_base_.dat_v1_deform_strides, drop_path_rate=0.2,
                  init_cfg=dict(checkpoint='checkpoints/dat_tiny_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
# DAT (v1) with the PVT Semantic FPN recipe: as DAT++ but lr 1e-4.
optim_wrapper = dict(optimizer=dict(lr=1e-4))
