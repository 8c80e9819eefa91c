# DAT (v1) with the Swin UperNet recipe the paper followed: as DAT++ T++, but in fp32 without checkpointing.
_base_ = './upernet_dat-t++_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='tiny', deform_strides=_base_.dat_v1_deform_strides, drop_path_rate=0.3,
                  with_cp=False, init_cfg=dict(checkpoint='checkpoints/dat_tiny_in1k_224.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(type='OptimWrapper')
