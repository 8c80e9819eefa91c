_base_ = './mask2former_dat-t++_8xb2-lsj-50e_coco.py'

model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.5,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_small_in1k_224.pth')),
    panoptic_head=dict(in_channels=[96, 192, 384, 768]))
