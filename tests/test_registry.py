"""The backbone is reachable from mmdet and mmseg registries and configs by its scoped name."""
import pytest
import torch
from mmengine.config import Config

from dat_mm import DAT


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_backbone_builds_from_each_library(scope, tmp_path):
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(
        f"default_scope = '{scope}'\n"
        "custom_imports = dict(imports=['dat_mm'], allow_failed_imports=False)\n"
        "backbone = dict(type='dat_mm.DAT', arch='tiny++', out_indices=(1, 2, 3))\n")
    cfg = Config.fromfile(str(cfg_file))
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.backbone)
    assert isinstance(model, DAT) and model.out_indices == (1, 2, 3)
    with torch.no_grad():
        feats = model.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [128, 256, 512]
