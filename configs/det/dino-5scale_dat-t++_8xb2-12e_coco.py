# DINO with five feature levels and DAT-T++, trained as mmdet's Swin-L DINO is (docs/recipes.md#dino-and-mask2former):
# AdamW lr 1e-4, weight decay 1e-4, backbone LR x0.1, gradients clipped at norm 0.1, 12 epochs with one step
# after epoch 11, batch 16 (8 GPUs x 2 images), DETR multi-scale + crop augmentation, fp32, backbone checkpointing.
# DAT's own rule on top: no weight decay on norms and bias tables (dat_mm/optim.py).
_base_ = 'mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py'
from dat_mm.optim import dat_custom_keys  # noqa: E402  (after _base_: see dat_mm/optim.py)

custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
                  with_cp=True, init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    # Four stages in, a fifth level from a stride-2 conv on the last: the base's num_outs, num_feature_levels and
    # encoder / decoder num_levels are all 5 already.
    neck=dict(in_channels=[64, 128, 256, 512]))
# DAT++ T, S and B share their parameter names, so the S++ and B++ configs keep these keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dat_custom_keys('tiny++', backbone_lr_mult=0.1)))
