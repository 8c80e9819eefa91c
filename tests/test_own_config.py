"""Every config the README's "Use DAT in your own config" and docs/own_config.md show, as a user would save it: it
loads over the mmdet / mmseg config it names, builds, gives DAT's norms and bias tables no weight decay at the
backbone's LR, and trains one step on a random batch."""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from commands import ROOT
from configs import build_model


def _snippets() -> list:
    readme = (ROOT / 'README.md').read_text()
    section = readme.split('## Use DAT in your own config', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, re.S)
    blocks += re.findall(r'```python\n(.*?)```', (ROOT / 'docs' / 'own_config.md').read_text(), re.S)
    return [b for b in blocks if b.startswith('_base_ = ')]


SNIPPETS = _snippets()
IDS = [re.match(r"_base_ = '(\w+)::[\w-]+/([\w-]+)", s).group(2) for s in SNIPPETS]


def test_the_docs_show_a_snippet_for_each_kind_of_model():
    bases = [re.match(r"_base_ = '(\S+)'", s).group(1) for s in SNIPPETS]
    assert [b.split('/')[0] for b in bases] == ['mmdet::swin', 'mmdet::dino', 'mmdet::mask2former',
                                                'mmseg::swin', 'mmseg::mask2former']


def _random_batch(scope: str, with_mask: bool) -> dict:
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 160), (3, 96, 128)], num_items=[3, 2],
                              num_classes=80, with_mask=with_mask)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 128, 128)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)


@pytest.mark.parametrize('snippet', SNIPPETS, ids=IDS)
def test_snippet_builds_and_trains_a_step(snippet, tmp_path):
    path = tmp_path / 'my_config.py'
    path.write_text(snippet)
    cfg = Config.fromfile(str(path))
    scope = re.match(r"_base_ = '(\w+)::", snippet).group(1)
    cfg.model.backbone.init_cfg = None   # no ImageNet checkpoint here
    if scope == 'mmdet' and cfg.model.type == 'Mask2Former':
        cfg.model.data_preprocessor.batch_augments = None   # no padding to 1024x1024 on a CPU
        cfg.model.train_cfg.num_points = 1024
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (128, 128)
        if cfg.model.decode_head.type == 'Mask2FormerHead':
            cfg.model.decode_head.train_cfg.num_points = 1024
    torch.manual_seed(0)
    model = build_model(cfg, scope)
    assert type(model.backbone).__name__ == 'DAT'

    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr, base_wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    backbone_lr = base_lr * cfg.optim_wrapper.paramwise_cfg.custom_keys.get('backbone', {}).get('lr_mult', 1.0)
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    for name, param in model.backbone.named_parameters():
        group = group_of[id(param)]
        assert group['lr'] == pytest.approx(backbone_lr), name
        no_decay = 'norm' in name or 'rpe_table' in name
        assert group['weight_decay'] == pytest.approx(0.0 if no_decay else base_wd), name

    before = model.backbone.patch_proj[0].weight.detach().clone()
    model.train()
    losses = model.train_step(_random_batch(scope, with_mask='mask' in cfg.model.type.lower()), wrapper)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    assert not torch.equal(model.backbone.patch_proj[0].weight, before), 'the backbone took no step'
