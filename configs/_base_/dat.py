# Shared by every DAT config, detection and segmentation alike.
custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)

# The authors' recipes exclude norms and relative position bias tables from weight decay.
dat_paramwise_cfg = dict(custom_keys={
    'norm': dict(decay_mult=0.),
    'rpe_table': dict(decay_mult=0.),
    'relative_position_bias_table': dict(decay_mult=0.),
    'absolute_pos_embed': dict(decay_mult=0.)})
