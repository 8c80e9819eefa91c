_base_ = './retinanet_dat-t++_fpn_ms-crop-1x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.2))
train_cfg = dict(max_epochs=36)
param_scheduler = _base_.schedule_3x
