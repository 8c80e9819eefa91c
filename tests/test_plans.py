"""The attention layers' execution plans (dat_mm/models/layers/plan.py): the device plan, which GPUs run, on
this CPU: what it dispatches, what it reads back to the host, its compiled graph; and the cpu plan's kernels
as registered operators. Numbers against the authors' model under both plans: test_golden.py."""
import copy
import os
import sys

import pytest
import torch

from commands import ROOT
from dat_mm import DAT
from dat_mm.models.layers import deformable_bias
from dat_mm.models.layers.plan import attention_budget_bytes, attention_plan
from golden import arch_from_authors_kwargs, golden_model, load_bundle

sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))
from count_ops import OpCounter  # noqa: E402


def test_the_plan_follows_the_device_unless_forced(monkeypatch):
    monkeypatch.delenv('DAT_MM_ATTENTION_PLAN', raising=False)
    assert attention_plan(torch.device('cpu')) == 'cpu'
    assert attention_plan(torch.device('cuda', 0)) == 'device'
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'device')
    assert attention_plan(torch.device('cpu')) == 'device'
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'gpu')
    with pytest.raises(ValueError, match=r"DAT_MM_ATTENTION_PLAN='gpu': expected one of \('cpu', 'device'\)"):
        attention_plan(torch.device('cpu'))


def test_the_attention_budget_is_a_positive_number_of_megabytes(monkeypatch):
    monkeypatch.delenv('DAT_MM_ATTENTION_BUDGET_MB', raising=False)
    assert attention_budget_bytes() == 2 ** 31
    monkeypatch.setenv('DAT_MM_ATTENTION_BUDGET_MB', '0.5')
    assert attention_budget_bytes() == 2 ** 19
    for bad in ('0', 'lots'):
        monkeypatch.setenv('DAT_MM_ATTENTION_BUDGET_MB', bad)
        with pytest.raises(ValueError, match='DAT_MM_ATTENTION_BUDGET_MB'):
            attention_budget_bytes()


@pytest.mark.parametrize('plan', ['cpu', 'device'])
def test_index_tensors_first_built_under_inference_mode_serve_a_training_step(plan, monkeypatch):
    """The per-size caches outlive the call that filled them; inference tensors could not be saved for a
    backward."""
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    model, _ = golden_model('pp', torch.float32)
    x = torch.randn(1, 3, 72, 88)   # a size no other test builds
    with torch.inference_mode():
        model(x)
    model.train()
    sum(f.sum() for f in model(x)).backward()
    assert all(p.grad is not None for p in model.parameters())


def _counted_step(model: DAT, x: torch.Tensor) -> OpCounter:
    """One training step (forward and backward) and one inference forward, counted together."""
    model.train()
    with OpCounter() as counter:
        feats = model(x)
        sum(f.sum() for f in feats).backward()
        model.eval()
        with torch.no_grad():
            model(x)
    return counter


@pytest.mark.parametrize('name', ['pp', 'v1'])
def test_the_device_plan_reads_nothing_back_and_dispatches_as_many_ops_at_any_size(name, monkeypatch):
    """On a GPU each op is a kernel launch and each read-back a stall: the device plan's count must not grow
    with the image, and nothing may be read back. The cpu plan's loops do grow (the measure can fail)."""
    arch = arch_from_authors_kwargs(__import__('json').loads(load_bundle(name)['kwargs']))
    model = DAT(arch=arch)
    counts = {}
    for plan in ('device', 'cpu'):
        monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
        for size in ((128, 192), (256, 384)):
            x = torch.randn(2, 3, *size)
            _counted_step(model, x)   # the per-size index tensors are built once, on the first call
            counter = _counted_step(model, x)
            counts[plan, size] = counter.total()
            if plan == 'device':
                assert not counter.syncs, dict(counter.syncs)
    assert counts['device', (256, 384)] <= counts['device', (128, 192)] * 1.02, counts
    if name == 'pp':   # the neighborhood attention's rows of tiles
        assert counts['cpu', (256, 384)] > counts['cpu', (128, 192)] * 1.2, counts


def _gradients(model: DAT, run, x: torch.Tensor) -> tuple:
    """Outputs and parameter gradients of one training step of ``run`` (model or its compiled self)."""
    model.train()
    model.zero_grad(set_to_none=True)
    outs = run(x)
    weights = [torch.sin(torch.arange(o.numel(), dtype=o.dtype)).view_as(o) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare_compiled(model: DAT, x: torch.Tensor, backend: str) -> None:
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        eager = model.eval()(x)
        for a, b in zip(compiled(x), eager):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    eager_outs, eager_grads = _gradients(model, model, x)
    outs, grads = _gradients(model, compiled, x)
    for a, b in zip(outs, eager_outs):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # Each gradient within 2e-5 of its scale of eager's, or four times eager's own fp32 error (_fp32_slack) where
    # that is larger: compiled code sums in another order (inductor's kernels; LayerNorm2d's compiled form under any
    # backend: its weight's gradient sums over every pixel), and some gradients sum many cancelling terms (the offset
    # convs', the bias of the conv before a norm).
    _assert_gradients_match(grads, eager_grads, _fp32_slack(model, x, eager_grads))


def _assert_gradients_match(grads: dict, eager_grads: dict, slack: dict, where=()) -> None:
    """Each gradient within 2e-5 of its scale of eager's, or the given slack. proj_k.bias has a true gradient of zero
    (softmax ignores what adds to all of a query's scores; see test_layers.py): both must be rounding noise, small
    against proj_k.weight's gradient."""
    for key, b in eager_grads.items():
        if key.endswith('proj_k.bias'):
            scale = eager_grads[key.replace('bias', 'weight')].abs().max()
            assert max(grads[key].abs().max(), b.abs().max()) <= 1e-4 * scale, (*where, key)
        else:
            assert (grads[key] - b).abs().max() <= max(2e-5 * b.abs().max(), slack.get(key, 0.0)) + 1e-6, (*where, key)


def _fp32_slack(model: DAT, x: torch.Tensor, eager_grads: dict) -> dict:
    """Per parameter, four times eager's own fp32 error in its gradient (from a float64 step of a copy of the model):
    a compiled gradient within it is at most three times eager's error away from the float64 one."""
    double = copy.deepcopy(model).double()
    _, exact = _gradients(double, double, x.double())
    return {key: 4 * (b.double() - exact[key]).abs().max().item() for key, b in eager_grads.items()}


# aot_eager traces what inductor compiles (Dynamo's one graph, AOTAutograd's forward and backward graphs with
# the attention's autograd Functions and the kernels' operators) and runs it with eager kernels. Inductor's
# own code generation takes 100-260 s per model here, cold: DAT_MM_TEST_INDUCTOR=1 adds it.
INDUCTOR = pytest.mark.skipif(os.environ.get('DAT_MM_TEST_INDUCTOR') != '1',
                              reason='inductor code generation: set DAT_MM_TEST_INDUCTOR=1')
BACKENDS = ['aot_eager', pytest.param('inductor', marks=INDUCTOR)]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name,plan', [('pp', 'device'), ('v1', 'device'), ('pp', 'cpu')])
def test_the_backbone_compiles_into_one_graph_for_inference_and_training(name, plan, backend, monkeypatch):
    """torch.compile(fullgraph=True) fails on any graph break; outputs and every gradient match eager mode. The
    cpu plan compiles too: its kernels are operators, and compiled, its neighborhood attention takes the device
    plan's tiles (its own loop over tile rows would fix the map size)."""
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    torch._dynamo.reset()
    model, _ = golden_model(name, torch.float32)
    torch.manual_seed(0)
    _compare_compiled(model, torch.randn(2, 3, 64, 96), backend)


# Small enough to trace symbolically in minutes: every block kind of each family, one block per stage past the first.
DYNAMIC_ARCHS = {
    'pp': dict(version=2, dims=(16, 32, 64, 128), depths=(2, 1, 1, 1), heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
               blocks=('ND', 'D', 'D', 'D')),
    'v1': dict(version=1, dims=(16, 32, 64, 128), depths=(2, 1, 1, 1), heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
               blocks=('LS', 'D', 'D', 'D')),
}


@pytest.mark.parametrize('name,plan,backend', [
    ('pp', 'device', 'aot_eager'),
    pytest.param('pp', 'device', 'inductor', marks=INDUCTOR),
    pytest.param('pp', 'cpu', 'inductor', marks=INDUCTOR),
    pytest.param('v1', 'device', 'inductor', marks=INDUCTOR)])
def test_one_dynamic_shape_graph_serves_three_input_sizes_in_training(name, plan, backend, monkeypatch,
                                                                      inductor_defaults):
    """torch.compile(dynamic=True), as multi-scale training ends up compiling (after a second size, dynamo
    marks the sizes symbolic): one graph, no recompilation at later sizes, outputs and every gradient equal
    eager at each. aot_eager traces Dynamo's and AOTAutograd's graphs on symbolic sizes; inductor also lowers
    them, with the settings tools/train.py gives symbolic sizes (docs/design.md#torchcompile)."""
    from torch._dynamo.utils import counters

    from dat_mm.runner import inductor_for_symbolic_sizes
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    model = DAT(arch=DYNAMIC_ARCHS[name])
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    inductor_for_symbolic_sizes(verbose=False)   # undone after the test (inductor_defaults)
    _compare_at_sizes(model, compiled)
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])


def _compare_at_sizes(model: DAT, compiled) -> None:
    # Stage-1 maps of 16x24, 22x18 and 24x16: the third is the first whose width is not a whole number of
    # neighborhood tiles (6), the case where a graph that fixed it would compile again.
    for size in ((64, 96), (88, 72), (96, 64)):
        x = torch.randn(2, 3, *size)
        eager_outs, eager_grads = _gradients(model, model, x)
        outs, grads = _gradients(model, compiled, x)
        for a, b in zip(outs, eager_outs):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max(), size
        _assert_gradients_match(grads, eager_grads, _fp32_slack(model, x, eager_grads), (size,))


def _kernel_arguments(dtype: torch.dtype) -> dict:
    """Arguments of the two operators for 2 images, 2 offset groups of 3 heads, 7 queries, 5 keys."""
    torch.manual_seed(0)
    groups, heads, batch, queries, keys = 2, 3, 2, 7, 5
    table = torch.nn.functional.pad(torch.randn(groups, heads, 6, 8, dtype=dtype), (1, 1, 1, 1))
    qx, qy = (torch.rand(queries, dtype=dtype) - 0.5 for _ in range(2))
    kx, ky = (torch.rand(batch * groups, keys, dtype=dtype) - 0.5 for _ in range(2))
    scores = torch.randn(batch * groups * heads, queries, keys, dtype=dtype)
    return dict(coords=(table, qx, qy, kx, ky), out=torch.empty(batch * groups, heads, queries, keys, dtype=dtype),
                scores=scores, delta=torch.randn(batch * groups * heads, queries, dtype=dtype),
                grad=torch.randn_like(scores))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_the_cpu_kernels_are_operators_that_pass_opcheck(dtype):
    """Schemas (what each writes), fake kernels (what torch.compile traces) and dispatch, by torch's own checks."""
    assert deformable_bias.available(), 'the CPU kernels did not build'
    ops = torch.ops.dat_mm
    a = _kernel_arguments(dtype)
    torch.library.opcheck(ops.deformable_bias_out.default, (*a['coords'], a['out']))
    torch.library.opcheck(ops.deformable_biased_softmax_backward_.default,
                          (*a['coords'], 0.3, a['scores'], a['delta'], a['grad']))
    grad_table, grad_keys = ops.deformable_biased_softmax_backward_(*a['coords'], 0.3, a['scores'], a['delta'],
                                                                    a['grad'])
    assert grad_table.shape == a['coords'][0].shape and grad_keys.shape == (4, 2, 5)


# One DAT-T++ stage-1 deformable layer at 1344x800, batch 2, in the device plan: the resident memory a forward
# and a backward add above what they start and end with (inputs, outputs, saved tensors, gradients). Large
# allocations go straight to mmap (MALLOC_MMAP_THRESHOLD_), so that freed memory leaves the resident set.
BUDGET_RUN = '''
import json, sys, torch
sys.path.insert(0, {analysis!r})
from benchmark import reset_peak_rss, rss_mb
from dat_mm.models.layers import DeformableAttention
torch.manual_seed(0)
layer = DeformableAttention(64, 2, 1, stride=8, offset_kernel=9, offset_range_factor=-1, table_size=(56, 56), version=2)
layer(torch.randn(1, 64, 24, 40, requires_grad=True))[0].sum().backward()   # libraries and thread pools
x = torch.randn(2, 64, 200, 336, requires_grad=True)
start = reset_peak_rss()
out = layer(x)[0]
forward = rss_mb('VmHWM') - rss_mb('VmRSS')
grad = torch.ones_like(out)
start = reset_peak_rss()
out.backward(grad)
backward = rss_mb('VmHWM') - start
print(json.dumps(dict(forward=forward, backward=backward, map=x.numel() * 4 / 2 ** 20)))
'''


@pytest.mark.parametrize('budget', [256, 1024])
def test_the_attention_budget_bounds_what_a_deformable_chunk_holds_in_either_pass(budget, tmp_path):
    """DAT_MM_ATTENTION_BUDGET_MB bounds the (queries x keys) tensors of a chunk (bias, grid, P, dS, the grid's
    gradient), in both passes. Above the layer's inputs, outputs and saved tensors, a pass may hold the budget and
    a few maps of the layer's own size, which do not grow with the keys: the backward holds q's gradient, the
    output's gradient in the heads' layout and their copies, 3 maps measured; 5 maps (164 MB) allowed. When the
    budget bounded the bias alone, the peak was 2.9-5.2x the budget."""
    import json
    import subprocess
    from commands import tool_env
    script = tmp_path / 'run.py'
    script.write_text(BUDGET_RUN.format(analysis=str(ROOT / 'tools' / 'analysis')))
    env = tool_env(DAT_MM_ATTENTION_PLAN='device', DAT_MM_ATTENTION_BUDGET_MB=str(budget),
                   MALLOC_MMAP_THRESHOLD_='131072')
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ('forward', 'backward'):
        assert peaks[key] <= budget + 5 * peaks['map'], peaks
