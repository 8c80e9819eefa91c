# The DAT++ authors' UperNet recipe is the Swin one mmseg ships: AdamW lr 6e-5, weight decay 0.01, 1500
# iterations of linear warm-up, poly decay (power 1) to 0 over 160k iterations at batch 16, auxiliary
# FCN head on stage 3. Multi-scale + flip testing: tools/test.py --tta. As the authors trained T++ and S++: fp16
# mixed precision with a dynamic loss scale, and activation checkpointing in the backbone.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
          '../_base_/dat.py']

model = dict(
    backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++', drop_path_rate=0.3, with_cp=True,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat_pp_tiny_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic', paramwise_cfg=_base_.dat_paramwise_cfg)
