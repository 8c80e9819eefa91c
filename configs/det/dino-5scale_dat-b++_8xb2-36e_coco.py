_base_ = './dino-5scale_dat-t++_8xb2-36e_coco.py'

model = dict(
    backbone=dict(arch='base++', drop_path_rate=0.7,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
