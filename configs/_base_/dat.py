# Shared by every DAT config, detection and segmentation alike.
_base_ = []   # first: MMEngine then reads this file as a plain config, whose imports run (dat_mm/optim.py)
from dat_mm.optim import dat_custom_keys  # noqa: E402

custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)

# The authors' recipes exclude norms and relative position bias tables from weight decay ('norm', 'rpe_table',
# 'relative_position_bias_table', 'absolute_pos_embed'); the rule lives in dat_mm.optim, which users import too.
dat_paramwise_cfg = dict(custom_keys=dat_custom_keys())

# DAT v1 in detectors and segmentors: the stage-3 deformable blocks sample keys on a stride-2 grid, where the
# ImageNet models use stride 1. Only this reproduces the paper's dense-prediction FLOPs with attention products
# counted, the convention its ImageNet FLOPs follow; see docs/v1_sampling_stride.md.
dat_v1_deform_strides = (1, 1, 2, 1)
