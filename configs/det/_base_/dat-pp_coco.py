# The DAT++ authors' COCO recipe (docs/recipes.md): 500-iteration warm-up, total batch 64
# (2 images per GPU; pass --auto-scale-lr to scale the LR to another total), fp16 mixed precision.
# The LR (2e-4 RetinaNet, 4e-4 otherwise) is set by each detector's config.
_base_ = './dat_coco.py'

optim_wrapper = dict(type='AmpOptimWrapper')
param_scheduler = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
                   _base_.param_scheduler[1]]
schedule_3x = [param_scheduler[0], _base_.schedule_3x[1]]
auto_scale_lr = dict(base_batch_size=64)
