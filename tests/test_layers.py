"""The attention layers' fast paths against plain autograd, beyond what the golden models exercise."""
import copy

import pytest
import torch

from dat_mm.models.layers import DeformableAttention, NeighborhoodAttention
from dat_mm.models.layers.attention_backward import attention_backward
from dat_mm.models.layers import deformable_bias
from dat_mm.models.layers.deformable_attention import _GridSampleLookup, _KernelLookup
from dat_mm.models.layers.neighborhood_attention import _tiles


def test_attention_backward_equals_autograd_through_the_plain_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    bias = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    out = ((q @ k.transpose(1, 2)) * 0.3 + bias).softmax(-1) @ v
    grad_out = torch.randn_like(out)
    theirs = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    ours = attention_backward(q.detach(), k.detach(), v.detach(), bias.detach(), out.detach(), grad_out, 0.3)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize('plan', ['cpu', 'device'])
@pytest.mark.parametrize('layer', ['deformable', 'neighborhood'])
def test_fast_and_reference_paths_agree_in_fp32_on_a_detection_sized_map(layer, plan, monkeypatch):
    """fp32, batch 2, a map of stride 8 of a 1344x800 image cut to 100x168 (stage 2 of DAT++), in training and
    in inference, under each execution plan."""
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    torch.manual_seed(0)
    if layer == 'deformable':
        fast = DeformableAttention(128, 4, 2, stride=4, offset_kernel=7, offset_range_factor=-1,
                                   table_size=(28, 28), version=2)
        torch.nn.init.normal_(fast.rpe_table, std=0.5)
    else:
        fast = NeighborhoodAttention(128, 4)
        torch.nn.init.normal_(fast.rpb, std=0.5)
    ref = copy.deepcopy(fast)
    ref.reference = True
    x = torch.randn(2, 128, 100, 168, requires_grad=True)
    outs, grads = [], []
    for module in (fast, ref):
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.sin(torch.arange(out.numel(), dtype=torch.float32)).view_as(out)
        grads.append(torch.autograd.grad((out * weights).sum(), [x, *module.parameters()]))
        outs.append(out)
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() / scale < 1e-5
    # proj_k.bias has a true gradient of zero (a constant added to every key's score): both paths give
    # rounding noise of about 1e-7 there, hence the absolute floor.
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-5
    with torch.no_grad():   # as inference runs: no autograd graph, nothing saved for a backward
        out = fast(x)
    out = out[0] if isinstance(out, tuple) else out
    assert (out - outs[1]).abs().max() / scale < 1e-5


@pytest.mark.parametrize('heads_per_group', [2, 3])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_cpu_kernels_attend_and_differentiate_as_grid_sample_does(dtype, heads_per_group):
    """Both bias lookups on the same points, some of them off the table (DAT's bounded offsets can carry a
    key past the border: grid_sample reads zeros there), over two chunks of queries: the bias, and every
    gradient of the attention backward (the kernels fuse the bias into the softmax and its backward). Two
    heads per group take the backward's vector scatter, other counts its scalar one."""
    assert deformable_bias.available(), 'the CPU kernels did not build'
    torch.manual_seed(0)
    groups, batch, dim, num_keys = 2, 2, 8, 40
    heads = groups * heads_per_group
    table = torch.randn(heads, 9, 13, dtype=dtype)
    keys = torch.rand(batch * groups, num_keys, 2, dtype=dtype) * 2.4 - 1.2   # positions, up to 0.2 past [-1, 1]
    qy, qx = torch.meshgrid(torch.linspace(-1, 1, 7, dtype=dtype), torch.linspace(-1, 1, 11, dtype=dtype),
                            indexing='ij')
    query = torch.stack([qx, qy], -1).reshape(-1, 2) * 0.5
    q, out, grad_out = (torch.randn(batch * heads, len(query), dim, dtype=dtype) for _ in range(3))
    k, v = (torch.randn(batch * heads, num_keys, dim, dtype=dtype) for _ in range(2))
    lookups = [_KernelLookup(table, keys, query, groups), _GridSampleLookup(table, keys, query, groups)]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for rows in (slice(0, 30), slice(30, 77)):
        ours, theirs = (lookup.bias(rows) for lookup in lookups)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < tol
        ours, theirs = (attention_backward(q[:, rows], k, v, lookup.chunk(rows), out[:, rows], grad_out[:, rows], 0.3)
                        for lookup in lookups)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and (a - b).abs().max() < tol * b.abs().max()
    for ours, theirs in zip(*(lookup.gradients() for lookup in lookups)):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < tol * theirs.abs().max()


def test_a_failed_kernel_build_warns_and_falls_back_to_grid_sample(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from dat_mm.models.layers import deformable_attention

    def no_compiler(*args, **kwargs):
        raise RuntimeError('no C++ compiler')

    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))   # no build there
    monkeypatch.setattr(deformable_bias, '_available', None)
    with pytest.warns(UserWarning, match='falls back to grid_sample.*no C\\+\\+ compiler'):
        assert not deformable_bias.available()
    table, keys, query = torch.zeros(2, 3, 3), torch.zeros(1, 4, 2), torch.zeros(5, 2)
    assert isinstance(deformable_attention._lookup(table, keys, query, 1, 'cpu'), _GridSampleLookup)


def test_a_graph_compiled_before_any_eager_call_calls_the_cpu_kernels(monkeypatch):
    """A compiled training run traces its first step before anything ran eagerly: the kernels load while Dynamo
    traces, that graph calls them, and a later eager call compiles nothing again (it once took grid_sample there,
    and compiled again after the first eager call had loaded the kernels)."""
    from torch._dynamo.utils import counters
    assert deformable_bias.available(), 'the CPU kernels did not build'
    monkeypatch.setattr(deformable_bias, '_available', None)   # as in a new process
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', 'cpu')
    torch.manual_seed(0)
    layer = DeformableAttention(32, 2, 1, stride=2, offset_kernel=3, offset_range_factor=-1, table_size=(8, 8),
                                version=2)
    x = torch.randn(1, 32, 8, 8)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend='aot_eager')
    with torch.profiler.profile() as prof:
        compiled(x)[0].sum().backward()
    called = {event.name for event in prof.events()}
    assert {'dat_mm::deformable_bias_out', 'dat_mm::deformable_biased_softmax_backward_'} <= called, called
    layer(x)[0].sum().backward()
    compiled(x)[0].sum().backward()
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])


def test_a_bug_in_loading_the_kernels_is_not_taken_for_a_missing_compiler(monkeypatch, tmp_path):
    """Only the failures of a machine that cannot build (RuntimeError, OSError) fall back to grid_sample."""
    from torch.utils import cpp_extension

    def bug(*args, **kwargs):
        raise TypeError('load() got an unexpected keyword argument')

    monkeypatch.setattr(cpp_extension, 'load', bug)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    monkeypatch.setattr(deformable_bias, '_available', None)
    with pytest.raises(TypeError, match='unexpected keyword'):
        deformable_bias.available()


@pytest.mark.compat
@pytest.mark.parametrize('plan', ['cpu', 'device'])
def test_neighborhood_attention_under_bf16_autocast_sums_its_table_gradient_in_fp32(plan, monkeypatch):
    """The tiled path attends in bf16 under autocast, but the table's gradient, a sum over every tile of the
    map, must not be rounded to bf16 along the way (it was off by 2.3% when it was)."""
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    torch.manual_seed(0)
    fast = NeighborhoodAttention(64, 2)
    torch.nn.init.normal_(fast.rpb, std=0.5)
    ref = copy.deepcopy(fast)
    ref.reference = True
    x = torch.randn(2, 64, 30, 41, requires_grad=True)
    results = []
    for module, autocast in ((fast, True), (ref, False)):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = module(x).float()
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), [x, module.rpb])))
    errors = [((ours - theirs).abs().max() / theirs.abs().max()).item() for ours, theirs in zip(*results)]
    assert max(errors[:2]) < 2e-2   # the output and dL/dx carry the bf16 projections' rounding
    assert errors[2] < 5e-3


def _deformable_layer_gradients(layer, x: torch.Tensor, autocast: bool) -> list:
    """dL/dx and every parameter's gradient of L = sum(out^2) for one deformable layer."""
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)[0]
    return [g.double() for g in torch.autograd.grad(out.float().square().sum(), [x, *layer.parameters()])]


@pytest.mark.compat
@pytest.mark.parametrize('plan', ['cpu', 'device'])
def test_deformable_gradients_under_bf16_autocast_sum_their_many_chunks_in_fp32(plan, monkeypatch):
    """Under bf16 autocast a deformable layer on a large map attends in 100+ chunks. dK and dV (hence proj_k's and
    proj_v's gradients) are sums over them: rounded to bf16 after each chunk, proj_v's weight and bias gradients
    came out 17% and 10x further from float64 than the same layer's in one chunk. Summed in fp32, every
    gradient stays within 10% of the one-chunk error (which the bf16 forward sets, as in plain autograd)."""
    from dat_mm.models.layers import deformable_attention
    monkeypatch.setenv('DAT_MM_ATTENTION_PLAN', plan)
    torch.manual_seed(0)
    layer = DeformableAttention(64, 2, 1, stride=8, offset_kernel=9, offset_range_factor=-1, table_size=(56, 56),
                                version=2)
    for conv in layer.modules():   # as DAT initialises them; PyTorch's default scale makes bf16's scores chaotic
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.trunc_normal_(conv.weight, std=0.02)
    torch.nn.init.normal_(layer.rpe_table, std=0.5)
    x = torch.randn(1, 64, 96, 160, requires_grad=True)   # 15,360 queries, 240 keys
    exact = _deformable_layer_gradients(copy.deepcopy(layer).double(), x.detach().double().requires_grad_(), False)
    calls = []
    chunks = deformable_attention._chunks
    monkeypatch.setattr(deformable_attention, '_chunks', lambda *a, **kw: calls.append(chunks(*a, **kw)) or calls[-1])
    errors = {}
    for count, budget_mb in (('one', 1024.0), ('many', 0.5)):
        monkeypatch.setenv('DAT_MM_ATTENTION_BUDGET_MB', str(budget_mb))
        if count == 'one':
            monkeypatch.setattr(deformable_attention, 'CHUNK_ELEMENTS', 1 << 30)
        calls.clear()
        grads = _deformable_layer_gradients(layer, x, True)
        lengths = [len(c) for c in calls]   # the forward's chunks, then the backward's
        assert lengths == [1, 1] if count == 'one' else max(lengths) >= 100, lengths
        errors[count] = [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, exact)]
    names = ['x', *(name for name, _ in layer.named_parameters())]
    compared = {name: (many, one) for name, many, one in zip(names, errors['many'], errors['one'])
                if name != 'proj_k.bias'}   # its true gradient is zero (see above): rounding noise only
    assert all(many <= 1.1 * one for many, one in compared.values()), compared


def test_deterministic_mode_on_cuda_stops_with_what_to_change():
    """grid_sample's CUDA backward has no deterministic kernel: the message names the setting and the way out.
    (On a GPU, tests/test_cuda.py runs a whole training step under it.)"""
    from dat_mm.models.layers.deformable_attention import check_nondeterminism_allowed
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=r'use_deterministic_algorithms\(True\).*randomness=dict\(deterministic=True\)'
                                               r'.*warn_only=True'):
            check_nondeterminism_allowed(torch.device('cuda', 0))
        check_nondeterminism_allowed(torch.device('cpu'))   # grid_sample's CPU backward is deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        check_nondeterminism_allowed(torch.device('cuda', 0))
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_traced_attention_paths_give_the_fast_paths_numbers():
    """What an ONNX export traces (plain ops, four parts of queries, one GridSample each; tiles as gathers and
    two matmuls), run eagerly in float64 against the device plan's Functions on the same inputs."""
    from dat_mm.models.layers import deformable_attention as da
    from dat_mm.models.layers import neighborhood_attention as na
    torch.manual_seed(0)
    groups, heads, batch, dim, queries, keys = 2, 4, 2, 8, 37, 11   # 37 queries: four unequal parts
    q = torch.randn(batch, heads, queries, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, keys, dim, dtype=torch.float64) for _ in range(2))
    table = torch.randn(heads, 9, 13, dtype=torch.float64)
    pos = torch.rand(batch * groups, keys, 2, dtype=torch.float64) * 2.4 - 1.2
    query = (torch.rand(queries, 2, dtype=torch.float64) * 2 - 1) * 0.5
    ours = da._biased_attention_traced(q, k, v, table, pos, query, groups, 0.3, 'device')
    theirs = da._ChunkedBiasedAttention.apply(q, k, v, table, pos, query, groups, 0.3, 'device')
    assert (ours - theirs).abs().max() < 1e-12

    layer = NeighborhoodAttention(16, 2).double()
    torch.nn.init.normal_(layer.rpb, std=0.5)
    hp, wp = 17, 23
    tiles = na._tiling(hp, wp, 7, layer.tile, torch.device('cpu'))
    qkv = torch.randn(3, batch, 2, hp * wp, 8, dtype=torch.float64)
    index = [tiles[key] for key in ('by', 'bx', 'kind', 'kind_cells')] + [tiles['queries'].view(-1),
                                                                          tiles['keys'].view(-1)]
    ours = na._attend_tiles_traced(qkv, layer._padded_table(), *index, layer.scale)
    theirs = na._TiledAttentionAtOnce.apply(qkv, layer._padded_table(), *index, layer.scale)
    assert (ours - theirs).abs().max() < 1e-12


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_layer_norm_2d_takes_the_same_values_and_dtype_in_its_compiled_form(dtype, autocast):
    """Compiled code normalises over dim 1 without permutes (see LayerNorm2d); it must give eager's numbers and
    eager's output dtype, with and without autocast, on the channels-last maps the blocks pass it."""
    from contextlib import nullcontext

    from dat_mm.models.layers import LayerNorm2d
    torch.manual_seed(0)
    norm = LayerNorm2d(24)
    with torch.no_grad():
        norm.norm.weight.normal_()
        norm.norm.bias.normal_()
    x = (torch.randn(2, 24, 5, 7) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16) if autocast else nullcontext():
        eager, compiled_form = norm(x), norm._over_dim1(x)
    assert compiled_form.dtype == eager.dtype and compiled_form.shape == eager.shape
    tolerance = 1e-5 if eager.dtype == torch.float32 else 2e-2
    assert (compiled_form.float() - eager.float()).abs().max() <= tolerance * eager.float().abs().max()


def test_neighborhood_attention_compiled_on_symbolic_sizes_serves_narrow_and_wide_maps_with_one_graph():
    """Compiled code (torch.compile(dynamic=True), aot_eager) tiles maps as one graph for every side of 7 px and
    more: narrower than a tile's key region (12 px) and wider, a whole number of tiles (6) and not. Outputs and
    gradients equal the reference path's in fp64."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    layer = NeighborhoodAttention(16, 2).double()
    torch.nn.init.normal_(layer.rpb, std=0.5)
    ref = copy.deepcopy(layer)
    ref.reference = True
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend='aot_eager', dynamic=True, fullgraph=True)
    for size in ((7, 9), (12, 18), (10, 13), (19, 8)):
        x = torch.randn(2, 16, *size, dtype=torch.float64)
        weights = torch.sin(torch.arange(x.numel(), dtype=torch.float64)).view_as(x)
        results = []
        for module in (compiled, ref):
            out = module(x.requires_grad_())
            grads = torch.autograd.grad((out * weights).sum(), [x, *module.parameters()])
            results.append((out, *grads))
        for a, b in zip(*results):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-10 * b.abs().max(), size
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])


@pytest.mark.parametrize('dynamic', [False, True])
def test_compiled_tiling_adds_spare_tiles_and_keys_only_on_symbolic_sizes(dynamic):
    """A static graph tiles a map as eager code does; a graph on symbolic sizes has one tile more where the tile
    divides the side and a 12-key region on narrower maps, which is what lets one graph serve every size."""
    from torch._dynamo.utils import counters

    from dat_mm.compat import traces_size_facts
    if not dynamic and not traces_size_facts:
        pytest.skip('torch < 2.8: Dynamo cannot answer statically_known_true, static graphs tile as symbolic ones')

    def tiling(x):
        keys, _ = _tiles(x.shape[-1], 7, 6, x.device)
        return keys

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiling, backend='eager', dynamic=dynamic, fullgraph=True)
    # length: (tiles, keys per tile) in eager mode
    for length, (tiles, region) in {12: (2, 12), 18: (3, 12), 10: (2, 10), 8: (2, 8)}.items():
        eager = tiling(torch.zeros(length))
        assert eager.shape == (tiles, region)
        keys = compiled(torch.zeros(length))
        if dynamic:
            assert keys.shape == (length // 6 + 1, 12), length
        else:
            assert torch.equal(keys, eager), length
    assert counters['stats']['unique_graphs'] == (1 if dynamic else 4)
