# DAT (v1) with the Swin multi-scale + crop 3x recipe.
_base_ = './retinanet_dat-t_fpn_1x_coco.py'

train_cfg = dict(max_epochs=36)
param_scheduler = _base_.schedule_3x
train_dataloader = dict(dataset=dict(pipeline=_base_.ms_crop_box_pipeline))
