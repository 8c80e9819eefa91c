# Mask2Former (panoptic) with DAT-T++, trained as mmdet's Swin-T panoptic Mask2Former is
# (docs/recipes.md#dino-and-mask2former):
# AdamW lr 1e-4, weight decay 0.05, backbone LR x0.1, no decay on the query and level embeddings nor on norms,
# gradients clipped at norm 0.01, 368,750 iterations ("50 epochs") at batch 16 (8 GPUs x 2 images), steps at
# 327,778 and 355,092, large-scale jittering to 1024x1024 crops, fp32. DAT's own rule on top: no weight decay on
# the backbone's norms and bias tables (dat_mm/optim.py); backbone checkpointing.
_base_ = 'mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py'
from dat_mm.optim import dat_custom_keys  # noqa: E402  (after _base_: see dat_mm/optim.py)

custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', drop_path_rate=0.3, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    # The pixel decoder reads all four stages.
    panoptic_head=dict(in_channels=[64, 128, 256, 512]))
# The base's keys name Swin's modules: replaced by DAT's, keeping its three embedding keys. DAT++ T, S and B share
# their parameter names, so the S++ and B++ configs keep these keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(
    _delete_=True, query_embed=_base_.embed_multi, query_feat=_base_.embed_multi, level_embed=_base_.embed_multi,
    **dat_custom_keys('tiny++', backbone_lr_mult=0.1))))
