"""Builds a DAT-T++ Mask R-CNN (mmdet) and UperNet (mmseg) and runs one prediction each on random input."""
import tempfile
import time
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

DET = """_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++'),
             neck=dict(in_channels=[64, 128, 256, 512]))
"""
SEG = """_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(pretrained=None,
             backbone=dict(_delete_=True, type='dat_mm.DAT', arch='tiny++'),
             decode_head=dict(in_channels=[64, 128, 256, 512], norm_cfg=norm_cfg),
             auxiliary_head=dict(in_channels=256, norm_cfg=norm_cfg))
"""


def build(text: str, scope: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'cfg.py'
        path.write_text(text)
        cfg = Config.fromfile(str(path))
    with DefaultScope.overwrite_default_scope(scope):
        registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
        return registry.build(cfg.model).eval()


def main() -> None:
    from mmdet.structures import DetDataSample
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    image = torch.rand(1, 3, 320, 320) * 255
    for scope, text, sample in (('mmdet', DET, DetDataSample), ('mmseg', SEG, SegDataSample)):
        model = build(text, scope)
        meta = dict(img_shape=(320, 320), ori_shape=(320, 320), pad_shape=(320, 320), scale_factor=(1., 1.))
        data = dict(inputs=[image[0]], data_samples=[sample(metainfo=meta)])
        start = time.time()
        with torch.no_grad():
            result = model.test_step(data)[0]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        what = (f'{len(result.pred_instances)} detections' if scope == 'mmdet'
                else f'segmentation map {tuple(result.pred_sem_seg.data.shape)}')
        print(f'{type(model).__name__} with DAT-T++ ({params:.1f}M params): {what} in {time.time() - start:.1f}s')


if __name__ == '__main__':
    main()
