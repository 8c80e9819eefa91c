"""What only a GPU can show: the device plan on CUDA against the reference in every precision, which SDPA
backends take its masks, deterministic mode, inductor on CUDA, and a detection-sized step's memory.

Skipped without CUDA. ``tools/analysis/gpu_check.sh`` runs this file and the CUDA benchmark on a GPU machine;
the tables the docs quote are printed and written to ``$DAT_MM_GPU_REPORT`` (default work_dirs/gpu_check).
Needs torch, mmengine and mmcv (mmcv-lite is enough); mmdet is optional (Swin-T then comes from timm).
``DAT_MM_TEST_DEVICE=cpu`` rehearses the file on a CPU (what has no CPU meaning is skipped), so that it is
known to run before a GPU is at hand.
"""
import copy
import json
import os
import sys

import pytest
import torch

from commands import ROOT
from dat_mm.models.layers import DeformableAttention, NeighborhoodAttention
from golden import golden_model, loss_weights, rel_err, stage_outputs

DEVICE = os.environ.get('DAT_MM_TEST_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                reason='needs a CUDA device (on a GPU machine: bash tools/analysis/gpu_check.sh)')
cuda_only = pytest.mark.skipif(DEVICE != 'cuda', reason='CUDA only')
REPORT = os.environ.get('DAT_MM_GPU_REPORT', str(ROOT / 'work_dirs' / 'gpu_check'))
HALF = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def report(name: str, payload) -> None:
    """Prints a result and keeps it in REPORT/name.json."""
    os.makedirs(REPORT, exist_ok=True)
    with open(os.path.join(REPORT, f'{name}.json'), 'w') as f:
        json.dump(payload, f, indent=1)
    print(f'\n[gpu_check] {name}: {json.dumps(payload)}', flush=True)


@pytest.fixture(autouse=True)
def ieee_fp32(monkeypatch):
    """The device plan everywhere, and fp32 as the CPU tests know it: TF32 in convolutions (cuDNN's default) and
    matmuls would move fp32 results by about 1e-3."""
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'device')
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('name', ['v1', 'pp'])
def test_the_device_plan_on_cuda_is_the_authors_model(name):
    """The golden cases (test_golden.py's tolerances): fp32 and float64 outputs, float64 gradients."""
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-6)):
        model, bundle = golden_model(name, dtype)
        model.to(DEVICE)
        for case, ref in bundle['cases'].items():
            with torch.no_grad():
                outs = stage_outputs(model, ref['input'].to(DEVICE, dtype))
            assert max(rel_err(o.cpu(), r) for o, r in zip(outs, ref['stage_outputs'])) < tolerance, (case, dtype)
    model, bundle = golden_model(name)
    model.to(DEVICE)
    ref = bundle['cases']['224x224_b1_grads']
    x = ref['input'].to(DEVICE, torch.float64).requires_grad_()
    outs = stage_outputs(model, x)
    sum((o * w.to(DEVICE)).sum() for o, w in zip(outs, loss_weights(outs))).backward()
    assert rel_err(x.grad.cpu(), ref['grad_input']) < 1e-5
    params = dict(model.named_parameters())
    for key, theirs in ref['grads'].items():
        if theirs.abs().max() > 1e-12:   # proj_k.bias: a true gradient of zero (test_golden.py)
            assert rel_err(params[key].grad.cpu(), theirs) < 1e-5, key


def _layer(kind: str):
    torch.manual_seed(0)
    if kind == 'deformable':
        layer = DeformableAttention(128, 4, 2, stride=4, offset_kernel=7, offset_range_factor=-1, table_size=(28, 28),
                                    version=2)
        torch.nn.init.normal_(layer.rpe_table, std=0.5)
    else:
        layer = NeighborhoodAttention(128, 4)
        torch.nn.init.normal_(layer.rpb, std=0.5)
    return layer.to(DEVICE)


def _run(layer, x: torch.Tensor, dtype=None) -> list:
    """Output and every gradient (input first) of L = sum(out * w), under autocast to ``dtype`` if given."""
    with torch.autocast(DEVICE, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
    weights = torch.sin(torch.arange(out.numel(), device=out.device, dtype=torch.float32)).view_as(out)
    grads = torch.autograd.grad((out.float() * weights).sum(), [x, *layer.parameters()])
    return [t.double() for t in (out, *grads)]


def _errors(ours: list, exact: list) -> list:
    return [((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(ours, exact)]


@pytest.mark.parametrize('kind', ['deformable', 'neighborhood'])
def test_the_device_plan_matches_the_reference_on_cuda_in_every_precision(kind):
    """A detection-sized map (stage 2 of DAT++ at 1344x800, batch 2), as test_layers.py on CPU. fp32: the CPU
    tolerances (outputs 1e-5, gradients 1e-4 of their scale). fp16 and bf16 under autocast: no further from a
    float64 reference than the plain reference path is in the same precision (twice its error at most)."""
    fast = _layer(kind)
    ref = copy.deepcopy(fast)
    ref.reference = True
    x = torch.randn(2, 128, 100, 168, device=DEVICE, requires_grad=True)
    exact = _run(copy.deepcopy(ref).double(), x.detach().double().requires_grad_())
    ours, theirs = _run(fast, x), _run(ref, x)
    assert (ours[0] - theirs[0]).abs().max() / theirs[0].abs().max() < 1e-5
    for a, b in zip(ours[1:], theirs[1:]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-5
    errors = {}
    names = ['output', 'input', *(n for n, _ in fast.named_parameters())]
    for name, dtype in HALF.items():
        # proj_k.bias has a true gradient of zero: rounding noise in both paths, left out.
        fast_error, ref_error = ({what: e for what, e in zip(names, _errors(_run(layer, x, dtype), exact))
                                  if what != 'proj_k.bias'} for layer in (fast, ref))
        errors[name] = dict(fast=max(fast_error.values()), reference=max(ref_error.values()))
        for what, f in fast_error.items():
            assert f <= 2 * ref_error[what] + 1e-3, (name, what, f, ref_error[what])
    report(f'precision_{kind}', errors)


def test_sdpa_backends_that_take_the_device_plans_masks():
    """Each SDPA backend forced in turn: which ones take the float masks (bias without grad, in q's dtype), and
    that each one that does gives the reference's numbers. At least one fused backend must take them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    results = {}
    for kind in ('deformable', 'neighborhood'):
        layer = _layer(kind)
        ref = copy.deepcopy(layer)
        ref.reference = True
        x = torch.randn(2, 128, 48, 80, device=DEVICE, requires_grad=True)
        for dtype_name, dtype in (('fp32', None), *HALF.items()):
            expected = _run(ref, x, dtype)
            tolerance = 1e-4 if dtype is None else 3e-2
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.MATH):
                key = f'{kind} {dtype_name} {backend.name}'
                try:
                    with sdpa_kernel(backend):
                        got = _run(layer, x, dtype)
                except RuntimeError as err:   # 'No available kernel': the backend refuses these inputs
                    results[key] = f'refused: {str(err).splitlines()[0][:100]}'
                    continue
                error = max(_errors(got[:2], expected[:2]))   # the backend runs the forward: output and dL/dx
                results[key] = f'takes them, max relative difference {error:.1e}'
                assert error < tolerance, key
            # On a CPU (the rehearsal) the fused kernel is the one called flash there.
            fused = [f'{kind} {dtype_name} {b}' for b in (('EFFICIENT_ATTENTION', 'CUDNN_ATTENTION') if DEVICE == 'cuda'
                                                          else ('FLASH_ATTENTION',))]
            assert any(results[k].startswith('takes') for k in fused), {k: results[k] for k in fused}
    report('sdpa_backends', results)


def test_a_training_step_under_deterministic_algorithms_runs_or_says_what_to_change(monkeypatch):
    """MMEngine's randomness=dict(deterministic=True) sets torch.use_deterministic_algorithms(True). cuBLAS then
    needs its workspace setting (torch's own message says so); with it, the step runs or stops with ours."""
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    model, _ = golden_model('pp', torch.float32)
    model.to(DEVICE).train()
    x = torch.randn(2, 3, 96, 128, device=DEVICE)
    outcome = {}
    for warn_only in (False, True):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        try:
            sum(f.sum() for f in model(x)).backward()
            outcome[f'warn_only={warn_only}'] = 'runs'
        except RuntimeError as err:
            message = str(err)
            outcome[f'warn_only={warn_only}'] = message[:300]
            assert not warn_only, message
            assert 'use_deterministic_algorithms' in message and 'warn_only=True' in message, message
        finally:
            torch.use_deterministic_algorithms(False)
    report('deterministic', outcome)


@cuda_only
def test_inductor_on_cuda_matches_eager():
    """A training step and an inference forward of the DAT++ mini model compiled by inductor (test_plans.py's
    comparison: every gradient within 1e-5 of its scale, or twice eager's own fp32 error)."""
    sys.path.insert(0, str(ROOT / 'tests'))
    from test_plans import _compare_compiled
    torch._dynamo.reset()
    model, _ = golden_model('pp', torch.float32)
    torch.manual_seed(0)
    _compare_compiled(model.to(DEVICE), torch.randn(2, 3, 64, 96, device=DEVICE), 'inductor')


@cuda_only
def test_peak_memory_of_a_detection_sized_training_step_next_to_swin():
    """DAT-T++ and Swin-T backbones, fwd+bwd at 1344x800, batch 2, under fp16 autocast, as the AMP configs
    train: the peak allocated memory each step adds above its model and input."""
    sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))
    from benchmark import swin_tiny
    from dat_mm import DAT
    peaks = {}
    for name in ('DAT-T++', 'Swin-T'):
        model = DAT(arch='tiny++') if name == 'DAT-T++' else swin_tiny(800, 1344)[0]
        model.cuda()
        model.train()   # not chained: mmdet's Swin returns None from train()
        x = torch.randn(2, 3, 800, 1344, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast('cuda', dtype=torch.float16):
            loss = sum(f.float().sum() for f in model(x))
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        del model, x, loss
        torch.cuda.empty_cache()
    peaks['DAT-T++ / Swin-T'] = peaks['DAT-T++'] / peaks['Swin-T']
    report('peak_memory_1344x800_b2_fp16', {k: round(v, 2) for k, v in peaks.items()})
    assert peaks['DAT-T++'] > 0 and peaks['Swin-T'] > 0
