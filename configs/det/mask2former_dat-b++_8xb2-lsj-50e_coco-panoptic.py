_base_ = './mask2former_dat-t++_8xb2-lsj-50e_coco-panoptic.py'

model = dict(
    backbone=dict(arch='base++', drop_path_rate=0.7,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    panoptic_head=dict(in_channels=[128, 256, 512, 1024]))
