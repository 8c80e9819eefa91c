_base_ = './upernet_dat-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='small', init_cfg=dict(checkpoint='checkpoints/dat_small_in1k_224.pth')))
