"""Loading the authors' checkpoints through init_cfg=dict(type='Pretrained', ...)."""
import json

import pytest
import torch

from dat_mm import DAT
from golden import arch_from_authors_kwargs, load_bundle, rel_err, stage_outputs


def _pretrained(name: str, checkpoint, tmp_path, **kwargs) -> DAT:
    path = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, path)
    arch = arch_from_authors_kwargs(json.loads(load_bundle(name)['kwargs']))
    model = DAT(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('wrap', ['imagenet', 'detector', 'ddp'])
def test_authors_checkpoints_load_as_they_are(wrap, tmp_path):
    bundle = load_bundle('v1')     # carries classifier weights and attn_mask / relative_position_index
    sd = bundle['state_dict']
    checkpoint = {
        'imagenet': {'model': sd, 'epoch': 300},
        'detector': {'state_dict': {**{f'backbone.{k}': v for k, v in sd.items()},
                                    'neck.lateral_convs.0.conv.weight': torch.zeros(1)}, 'meta': {}},
        'ddp': {'model': {f'module.{k}': v for k, v in sd.items()}},
    }[wrap]
    model = _pretrained('v1', checkpoint, tmp_path)
    case = bundle['cases']['224x224_b2']
    with torch.no_grad():
        outs = stage_outputs(model, case['input'].float())
    assert max(rel_err(o, r) for o, r in zip(outs, case['stage_outputs'])) < 1e-5


def test_imagenet_weights_load_under_the_dense_prediction_strides(tmp_path):
    # The v1 detection/segmentation configs sample stage-3 keys on a stride-2 grid; no weight depends on it.
    bundle = load_bundle('v1')
    model = _pretrained('v1', {'model': bundle['state_dict']}, tmp_path, deform_strides=(1, 1, 2, 1))
    for name, p in model.named_parameters():
        if not name.startswith('norm'):
            assert torch.equal(p, bundle['state_dict'][name]), name
    x = bundle['cases']['224x224_b2']['input'].float()
    with torch.no_grad():
        outs, points = stage_outputs(model, x, return_points=True)
    reference = bundle['cases']['224x224_b2']['stage_outputs']
    assert rel_err(outs[1], reference[1]) < 1e-5      # stages 1-2 hold no deformable block
    assert rel_err(outs[2], reference[2]) > 1e-3      # stage 3 attends to a quarter of the keys
    (h3, w3), (h4, w4) = outs[2].shape[-2:], outs[3].shape[-2:]
    positions3, positions4 = points[2][1][0], points[3][1][0]
    assert positions3.shape[2:4] == (-(-h3 // 2), -(-w3 // 2)) and positions4.shape[2:4] == (h4, w4)


def test_checkpoint_of_another_arch_is_refused_with_the_keys(tmp_path):
    with pytest.raises(ValueError, match=r'missing: .*unexpected: .*another shape'):
        _pretrained('pp', {'model': load_bundle('v1')['state_dict']}, tmp_path)


def test_bias_tables_are_resized_for_another_pretraining_size(tmp_path):
    sd = load_bundle('pp')['state_dict']
    model = _pretrained('pp', {'model': sd}, tmp_path, pretrain_img_size=448)
    table = model.stages[2].attns[1].rpe_table
    source = sd['stages.2.attns.1.rpe_table']
    assert table.shape[1:] == (55, 55) and source.shape[1:] == (27, 27)
    # align_corners resizing keeps the corners and the centre (zero displacement) exactly.
    for idx in [(0, 0), (-1, -1), (27, 27)]:
        src_idx = tuple(13 if i == 27 else i for i in idx)
        assert torch.allclose(table[:, idx[0], idx[1]], source[:, src_idx[0], src_idx[1]], atol=1e-5)
