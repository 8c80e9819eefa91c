_base_ = './mask2former_dat-t++_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.5,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]))
