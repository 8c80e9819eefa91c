_base_ = './cascade-mask-rcnn_dat-t++_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(arch='base++', drop_path_rate=0.8,
                  init_cfg=dict(checkpoint='checkpoints/dat_pp_base_in1k_224.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
# The authors trained this one in fp32.
optim_wrapper = dict(type='OptimWrapper')
# 1 image per GPU, as the authors trained it.
train_dataloader = dict(batch_size=1)
