"""Our DAT against the outputs of the authors' code (tests/data/golden)."""
import json
import math

import pytest
import torch

from dat_mm import DAT
from golden import GOLDEN_DIR, golden_model, load_bundle, loss_weights, rel_err, stage_outputs

# Also run on the torch 2.1 stack (tools/run_tests.sh).
pytestmark = pytest.mark.compat

CASES = [('v1', '224x224_b2'), ('v1', '224x224_b1_grads'), ('pp', '224x224_b2'), ('pp', '224x224_b1_grads'),
         ('pp', '200x328_b1'), ('pp', '96x96_b1')]
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}
# The fast attention under each execution plan (dat_mm/models/layers/plan.py), and the plain reference path.
PATHS = pytest.mark.parametrize('path', ['cpu-plan', 'device-plan', 'reference'])


@pytest.fixture
def reference(path, monkeypatch):
    """Whether the path is the reference attention; the plan of a fast path is forced for the test."""
    if path != 'reference':
        monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', path.split('-')[0])
    return path == 'reference'


# The device plan in fp32 is held to the reference at a detection-sized map (test_layers.py) instead.
@pytest.mark.parametrize('path,dtype', [('cpu-plan', torch.float64), ('cpu-plan', torch.float32),
                                        ('device-plan', torch.float64),
                                        ('reference', torch.float64), ('reference', torch.float32)],
                         ids=['cpu-plan-f64', 'cpu-plan-f32', 'device-plan-f64', 'reference-f64', 'reference-f32'])
@pytest.mark.parametrize('name,case', CASES, ids=[f'{n}-{c}' for n, c in CASES])
def test_stage_outputs_match_authors(name, case, dtype, reference):
    model, bundle = golden_model(name, dtype, reference)
    ref = bundle['cases'][case]
    with torch.no_grad():
        outs = stage_outputs(model, ref['input'].to(dtype))
    for i, (ours, theirs) in enumerate(zip(outs, ref['stage_outputs'])):
        assert ours.shape == theirs.shape, f'stage {i}'
        assert rel_err(ours, theirs) < TOLERANCE[dtype], f'stage {i}: {rel_err(ours, theirs):.2e}'


def test_sampling_points_match_authors():
    model, bundle = golden_model('v1')
    ref = bundle['cases']['224x224_b2']
    with torch.no_grad():
        _, points = stage_outputs(model, ref['input'].double(), return_points=True)
    compared = 0
    for stage in range(4):
        for block, (pos, refs) in enumerate(zip(ref['positions'][stage], ref['references'][stage])):
            assert (pos is None) == (points[stage][block] is None)
            if pos is not None:
                assert rel_err(points[stage][block][0], pos) < 1e-6
                assert rel_err(points[stage][block][1], refs) < 1e-6
                compared += 1
    assert compared == 2


@PATHS
@pytest.mark.parametrize('name', ['v1', 'pp'])
def test_gradients_match_authors(name, reference):
    model, bundle = golden_model(name, reference=reference)
    ref = bundle['cases']['224x224_b1_grads']
    x = ref['input'].double().requires_grad_()
    outs = stage_outputs(model, x)
    sum((o * w).sum() for o, w in zip(outs, loss_weights(outs))).backward()
    assert rel_err(x.grad, ref['grad_input']) < 1e-5
    params = dict(model.named_parameters())
    assert set(ref['grads']) == {k for k, p in params.items() if p.grad is not None}
    for key, theirs in ref['grads'].items():
        ours = params[key].grad
        if theirs.abs().max() < 1e-12:
            # proj_k.bias: adding the same q.b to every key's score leaves the softmax unchanged, so the
            # true gradient is zero and the reference holds rounding noise; compare absolutely.
            assert ours.abs().max() < 1e-12, key
        else:
            assert rel_err(ours, theirs) < 1e-5, f'{key}: {rel_err(ours, theirs):.2e}'


# Published ImageNet-1K parameter counts (docs/recipes.md), millions, classifier included.
PRESETS = {'tiny': ('dat_v1_tiny', 28.3), 'small': ('dat_v1_small', 49.7), 'base': ('dat_v1_base', 87.9),
           'tiny++': ('dat_pp_tiny', 24.0), 'small++': ('dat_pp_small', 53.1), 'base++': ('dat_pp_base', 93.7)}


@pytest.mark.parametrize('arch', list(PRESETS))
def test_presets_have_the_released_keys_and_sizes(arch):
    keys_file, published = PRESETS[arch]
    released = {k: tuple(s) for k, s in json.loads((GOLDEN_DIR / f'{keys_file}.keys.json').read_text())}
    recomputed = ('relative_position_index', 'attn_mask')
    expected = {k: s for k, s in released.items()
                if not k.startswith('cls_') and k.rsplit('.', 1)[-1] not in recomputed}
    model = DAT(arch=arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith('norm')}
    assert ours == expected
    classifier = sum(math.prod(s) for k, s in released.items() if k.startswith('cls_'))
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('norm')) + classifier
    assert abs(params / 1e6 - published) / published < 0.005, params


def test_bundle_weights_load_completely():
    bundle = load_bundle('pp')
    model, _ = golden_model('pp')
    loaded = {k for k in bundle['state_dict'] if not k.startswith('cls_')}
    assert loaded <= set(model.state_dict())


@pytest.mark.parametrize('lookup', ['kernels', 'grid_sample', 'device-plan'])
@pytest.mark.parametrize('name,case', [('v1', '224x224_b1_grads'), ('pp', '224x224_b1_grads')])
def test_fast_path_split_into_many_chunks_matches_authors(name, case, lookup, monkeypatch):
    from dat_mm.models.layers import deformable_attention, deformable_bias
    if lookup == 'device-plan':   # an attention budget of 64 KB: a few query rows per chunk
        monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'device')
        monkeypatch.setenv('DAT_MM_ATTENTION_BUDGET_MB', str(64 / 1024))
    else:
        monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'cpu')
        monkeypatch.setattr(deformable_attention, 'CHUNK_ELEMENTS', 4096)   # a few query rows per chunk
    if lookup == 'grid_sample':   # the cpu plan on a CPU machine that cannot compile the kernels
        monkeypatch.setattr(deformable_bias, 'available', lambda: False)
    model, bundle = golden_model(name)
    ref = bundle['cases'][case]
    x = ref['input'].double().requires_grad_()
    calls = []
    chunks = deformable_attention._chunks
    monkeypatch.setattr(deformable_attention, '_chunks', lambda *a, **kw: calls.append(chunks(*a, **kw)) or calls[-1])
    outs = stage_outputs(model, x)
    assert max(len(c) for c in calls) > 10
    assert max(rel_err(o, r) for o, r in zip(outs, ref['stage_outputs'])) < 1e-6
    sum((o * w).sum() for o, w in zip(outs, loss_weights(outs))).backward()
    assert rel_err(x.grad, ref['grad_input']) < 1e-5
    params = dict(model.named_parameters())
    for key in ('stages.2.attns.1.rpe_table', 'stages.3.attns.1.conv_offset.0.weight'):
        assert rel_err(params[key].grad, ref['grads'][key]) < 1e-5
