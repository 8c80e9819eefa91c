# Shared by every DAT config, detection and segmentation alike.
custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)

# The authors' recipes exclude norms and relative position bias tables from weight decay.
dat_paramwise_cfg = dict(custom_keys={
    'norm': dict(decay_mult=0.),
    'rpe_table': dict(decay_mult=0.),
    'relative_position_bias_table': dict(decay_mult=0.),
    'absolute_pos_embed': dict(decay_mult=0.)})

# DAT v1 in detectors and segmentors: the stage-3 deformable blocks sample keys on a stride-2 grid, where the
# ImageNet models use stride 1. Only this reproduces the paper's dense-prediction FLOPs with attention products
# counted, the convention its ImageNet FLOPs follow; see docs/v1_sampling_stride.md.
dat_v1_deform_strides = (1, 1, 2, 1)
