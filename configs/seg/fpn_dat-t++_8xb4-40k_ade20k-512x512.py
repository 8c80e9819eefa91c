# Semantic FPN "80k": 40k iterations at batch 32 (8 GPUs x 4 images), i.e. 80k at batch 16. DAT++ recipe:
# AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9) to 0, no warm-up.
_base_ = ['mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py', '../_base_/dat.py']

model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
                     paramwise_cfg=_base_.dat_paramwise_cfg)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
