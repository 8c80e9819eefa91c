_base_ = './upernet_dat-t++_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='base++', drop_path_rate=0.7,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
# The authors trained B++ in fp32 (still with backbone checkpointing).
optim_wrapper = dict(type='OptimWrapper')
