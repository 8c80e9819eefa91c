"""Loading the authors' checkpoints through init_cfg=dict(type='Pretrained', ...)."""
import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from dat_mm import DAT
from golden import arch_from_authors_kwargs, load_bundle, rel_err, stage_outputs

# Also run on the torch 2.1 stack (tools/run_tests.sh).
pytestmark = pytest.mark.compat


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


class _Shell:
    """Runs ``command`` when unpickled: what a safe reader must never build."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def _authors_imagenet_checkpoint(path, state_dict, monkeypatch) -> None:
    """Saves ``state_dict`` as the authors' ImageNet training does: model, optimizer and scheduler states, the
    best accuracy, the epoch, and the run's yacs config, a ``yacs.config.CfgNode`` (a dict subclass whose
    ``__dict__`` holds a set), pickled with NEWOBJ, BUILD and SETITEMS. yacs itself is not installed: a module of
    that name stands in while the file is written, and is gone when it is read."""
    import sys
    import types

    class CfgNode(dict):
        def __init__(self, init=None, new_allowed=False):
            super().__init__(init or {})
            self.__dict__.update({'__immutable__': True, '__deprecated_keys__': set(), '__renamed_keys__': {},
                                  '__new_allowed__': new_allowed})

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    module = types.ModuleType('yacs.config')
    module.CfgNode = CfgNode
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, 'yacs', types.ModuleType('yacs'))
        patch.setitem(sys.modules, 'yacs.config', module)
        config = CfgNode({'MODEL': CfgNode({'TYPE': 'dat', 'DROP_PATH_RATE': 0.2}),
                          'TRAIN': CfgNode({'EPOCHS': 300, 'BASE_LR': 1e-3})})
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([weight])
        weight.sum().backward()
        optimizer.step()
        torch.save({'model': state_dict, 'optimizer': optimizer.state_dict(),
                    'lr_scheduler': {'t_initial': 300, 'base_values': [1e-3]}, 'max_accuracy': 83.9,
                    'epoch': 299, 'config': config}, path)
    assert 'yacs' not in sys.modules


def _authors_mmdet2_checkpoint(path, state_dict) -> None:
    """Saves a detector as mmdet 2 (mmcv 1's runner) does: meta with class names, palette, the config's text, hook
    messages and numpy scalars, beside the weights under 'backbone.' and an optimizer state."""
    import numpy as np
    weights = {**{f'backbone.{k}': v for k, v in state_dict.items()}, 'neck.conv.weight': torch.zeros(1)}
    meta = dict(mmcv_version='1.7.1', time='Mon Jan  9 12:00:00 2023', CLASSES=('person', 'bicycle'),
                PALETTE=[(220, 20, 60), (119, 11, 32)], config="model = dict(type='MaskRCNN')", seed=np.int64(0),
                epoch=36, iter=263_000, hook_msgs=dict(last_ckpt='epoch_36.pth', best_score=np.float64(0.507)))
    torch.save({'meta': meta, 'state_dict': weights, 'optimizer': {'state': {}, 'param_groups': []}}, path)


def test_the_authors_imagenet_checkpoint_loads_as_their_training_saved_it(tmp_path, monkeypatch):
    from dat_mm.checkpoint import read_checkpoint
    bundle = load_bundle('pp')
    path = tmp_path / 'dat_pp_mini.pth'
    _authors_imagenet_checkpoint(path, bundle['state_dict'], monkeypatch)
    config = read_checkpoint(path)['config']
    assert type(config) is OrderedDict and config['MODEL']['DROP_PATH_RATE'] == 0.2
    # Through init_cfg, as a config loads it: the golden outputs come back.
    arch = arch_from_authors_kwargs(json.loads(bundle['kwargs']))
    model = DAT(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    case = bundle['cases']['224x224_b2']
    with torch.no_grad():
        outs = stage_outputs(model.eval(), case['input'].float())
    assert max(rel_err(o, r) for o, r in zip(outs, case['stage_outputs'])) < 1e-5


@pytest.mark.parametrize('kind', ['imagenet', 'mmdet2'])
def test_the_converter_takes_the_authors_checkpoints_as_saved(kind, tmp_path, monkeypatch):
    from commands import ROOT, tool_env
    bundle = load_bundle('pp')
    src = tmp_path / 'authors.pth'
    if kind == 'imagenet':
        _authors_imagenet_checkpoint(src, bundle['state_dict'], monkeypatch)
    else:
        _authors_mmdet2_checkpoint(src, bundle['state_dict'])
    arch = json.dumps(arch_from_authors_kwargs(json.loads(bundle['kwargs'])))
    proc = subprocess.run([sys.executable, str(ROOT / 'tools/convert_checkpoint.py'), str(src),
                           str(tmp_path / 'out.pth'), '--arch', arch], capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(tmp_path / 'out.pth', weights_only=True)['state_dict']
    prefix = 'backbone.' if kind == 'mmdet2' else ''
    assert torch.equal(saved[f'{prefix}stages.2.attns.1.rpe_table'], bundle['state_dict']['stages.2.attns.1.rpe_table'])


def test_a_checkpoint_holding_any_other_object_is_refused_before_it_runs(tmp_path):
    from commands import ROOT, tool_env
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'model': load_bundle('pp')['state_dict'], 'args': _Shell(f'touch {marker}')}, path)
    # Through init_cfg: the project's message, naming the object, and not torch's advice to turn safety off.
    arch = arch_from_authors_kwargs(json.loads(load_bundle('pp')['kwargs']))
    model = DAT(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'holds a Python object that is not plain data \(posix\.system\)') as err:
        model.init_weights()
    assert 'weights_only' not in str(err.value)
    # Through the converter.
    proc = subprocess.run([sys.executable, str(ROOT / 'tools/convert_checkpoint.py'), str(path),
                           str(tmp_path / 'out.pth'), '--arch', json.dumps(arch)], capture_output=True, text=True,
                          env=tool_env())
    assert proc.returncode != 0 and 'refusing to unpickle' in proc.stderr and 'posix.system' in proc.stderr
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


def test_a_pickle_that_sets_state_on_an_allowed_class_is_refused(tmp_path):
    """BUILD on a class named by an allowed global would change that class for the whole process."""
    import pickle

    from mmengine.logging import HistoryBuffer

    from dat_mm.checkpoint import UnsafeCheckpointError, read_checkpoint
    mean = HistoryBuffer.mean
    # HistoryBuffer (the class itself), then (None, {'mean': None}) as its slot state, then BUILD.
    stream = (b'\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer\nN}X\x04\x00\x00\x00meanNs\x86'
              + pickle.BUILD + b'.')
    path = tmp_path / 'class_state.pth'
    path.write_bytes(stream)
    with pytest.raises(UnsafeCheckpointError, match='state set on HistoryBuffer'):
        read_checkpoint(path)
    assert HistoryBuffer.mean is mean
