# As dino-5scale_dat-t++_8xb2-12e_coco.py, over mmdet's 36-epoch Swin-L DINO (steps after epochs 27 and 33), with
# the drop path of the DAT++ authors' long schedules.
_base_ = 'mmdet::dino/dino-5scale_swin-l_8xb2-36e_coco.py'
from dat_mm.optim import dat_custom_keys  # noqa: E402  (after _base_: see dat_mm/optim.py)

custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', out_indices=(0, 1, 2, 3), drop_path_rate=0.3,
                  with_cp=True, init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dat_custom_keys('tiny++', backbone_lr_mult=0.1)))
