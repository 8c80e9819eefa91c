"""Behaviour of the DAT backbone beyond the golden numbers: sizes, options, errors, precision, loading."""
import json

import pytest
import torch

from dat_mm import DAT
from golden import arch_from_authors_kwargs, golden_model, load_bundle, rel_err


def mini_arch(name: str) -> dict:
    return arch_from_authors_kwargs(json.loads(load_bundle(name)['kwargs']))


@pytest.fixture(scope='module', params=['v1', 'pp'])
def arch(request):
    return mini_arch(request.param)


@pytest.mark.parametrize('size', [(97, 133), (64, 200), (35, 47), (512, 683), (333, 517), (31, 5)])
def test_any_input_size_gives_finite_features_of_the_ceil_sizes(arch, size):
    """Stage i is ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) in both families: v1 pads to whole patches (as mmdet's
    Swin does) where it used to drop the last rows and columns, DAT++ convolves with padding."""
    model = DAT(arch=arch).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    h, w = size
    for i, f in enumerate(feats):
        stride = 4 * 2 ** i
        assert f.shape == (2, arch['dims'][i], -(-h // stride), -(-w // stride))
        assert torch.isfinite(f).all()


def test_the_last_rows_and_columns_reach_the_features(arch):
    """At 333x517 the bottom 13 rows and the right 5 columns fill no whole 32-pixel patch of stage 4: DAT v1 once
    dropped them, so that changing them changed no output."""
    model = DAT(arch=arch).eval()
    x = torch.randn(1, 3, 333, 517)
    edited = x.clone()
    edited[:, :, -1, -1] += 10.0   # the bottom-right pixel alone
    with torch.no_grad():
        before, after = model(x), model(edited)
    for f, g in zip(before, after):   # the corner feature of every stage
        assert (f - g)[..., -1, -1].abs().max() > 1e-3


def test_degenerate_one_pixel_stages_are_finite(arch):
    # 8x8 leaves 1x1 maps in the deepest stages, where the authors' grids divide by 0.
    model = DAT(arch=arch).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 8, 8))
    assert feats[-1].shape[-2:] == (1, 1)
    assert all(torch.isfinite(f).all() for f in feats)


def test_out_indices_select_normalised_stages(arch):
    model = DAT(arch=arch, out_indices=(1, 3)).eval()
    feats = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [arch['dims'][1], arch['dims'][3]]
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    # Each output passed through its own LayerNorm: unit variance over channels at every pixel.
    var = feats[1].var(dim=1, unbiased=False)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


def test_batch_elements_are_independent(arch):
    model = DAT(arch=arch).eval()
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    for a, b in zip(together, alone):
        assert torch.allclose(a[1:2], b, atol=1e-5)


def test_features_are_contiguous_nchw_as_mmcv_ops_read_them(arch):
    """mmcv's RoIAlign reads its input's memory as contiguous NCHW; channels-last features (what a channel
    LayerNorm leaves) gave every two-stage detector scrambled RoI features."""
    from mmcv.ops import roi_align
    feats = DAT(arch=arch).eval()(torch.randn(2, 3, 64, 96))
    assert all(f.is_contiguous() for f in feats)
    rois = torch.tensor([[0, 4.0, 8.0, 60.0, 40.0], [1, 10.0, 2.0, 90.0, 62.0]])
    pooled = roi_align(feats[0], rois, (7, 7), 0.25, 0, 'avg', True)
    channels_last = feats[0].contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(roi_align(channels_last, rois, (7, 7), 0.25, 0, 'avg', True), pooled), \
        'this mmcv reads channels-last input correctly; the contiguity would no longer matter'
    assert torch.equal(roi_align(feats[0].clone(), rois, (7, 7), 0.25, 0, 'avg', True), pooled)


@pytest.mark.parametrize('bad', [torch.randn(3, 64, 64), torch.randn(1, 4, 64, 64)], ids=['3d', '4ch'])
def test_wrong_input_raises_a_clear_error(bad):
    with pytest.raises(ValueError, match=r'expects a \(B, 3, H, W\)'):
        DAT(arch='tiny++')(bad)


@pytest.mark.parametrize('kwargs,error', [
    (dict(arch='huge'), KeyError), (dict(arch=dict(version=3)), KeyError),
    (dict(arch={**mini_arch('pp'), 'blocks': ['NL'] * 4}), ValueError),
    (dict(arch='tiny', frozen_stages=5), ValueError), (dict(arch='tiny', out_indices=(0, 0)), ValueError),
    (dict(arch='tiny', out_indices=(0, -4)), ValueError),
    (dict(arch='tiny', out_indices=(4,)), ValueError), (dict(arch='tiny', out_indices=(1, -5)), ValueError),
    (dict(arch='tiny', out_indices=()), ValueError),
    (dict(arch='tiny', init_cfg=[dict(type='Pretrained', checkpoint='a.pth'), dict(type='Pretrained', checkpoint='b.pth')]),
     ValueError),
    (dict(arch='tiny', init_cfg=dict(type='Pretrained')), ValueError),
    (dict(arch='tiny', init_cfg=['Pretrained']), TypeError),
    (dict(arch='tiny', deform_strides=(1, 1, 2)), ValueError), (dict(arch='tiny', deform_strides=(1, 1, 0, 1)), ValueError)])
def test_bad_configs_are_rejected(kwargs, error):
    with pytest.raises(error):
        DAT(**kwargs)


def test_negative_out_indices_count_from_the_last_stage():
    assert DAT(arch='tiny++', out_indices=(-1, 1)).out_indices == (1, 3)


def test_a_list_init_cfg_applies_the_checkpoint_over_the_other_initialisers(tmp_path):
    """MMEngine allows init_cfg to be a list; as its BaseModule does, a Pretrained entry is applied last."""
    torch.manual_seed(0)
    arch = mini_arch('pp')
    source = DAT(arch=arch)
    source.init_weights()
    path = tmp_path / 'weights.pth'
    torch.save({'model': source.state_dict()}, path)
    zero_convs = dict(type='Constant', layer='Conv2d', val=0.0, bias=0.0)
    only_init = DAT(arch=arch, init_cfg=[zero_convs])
    only_init.init_weights()
    assert only_init.patch_proj[0].weight.abs().max() == 0
    both = DAT(arch=arch, init_cfg=[dict(type='Pretrained', checkpoint=str(path)), zero_convs])
    both.init_weights()
    for name, value in source.state_dict().items():
        assert torch.equal(both.state_dict()[name], value), name


def test_frozen_stages_stay_frozen_through_train(arch):
    model = DAT(arch=arch, frozen_stages=2)
    model.train()
    frozen = [model.patch_proj, model.stages[0], model.stages[1], model.down_projs[0], model.norm0, model.norm1]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    assert model.stages[2].training and model.down_projs[1].training
    feats = model(torch.randn(1, 3, 64, 64))
    sum(f.sum() for f in feats).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in model.stages[3].parameters())


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1])
def test_checkpointing_covers_every_stage_that_trains(arch, frozen_stages, monkeypatch):
    """Behind the frozen stem (frozen_stages=0) or a frozen stage the input needs no gradient; the stage's own
    activations still fill memory, and those are what with_cp is for."""
    from dat_mm.models.backbones import dat
    calls = []
    checkpoint = dat.cp.checkpoint
    monkeypatch.setattr(dat.cp, 'checkpoint', lambda fn, i, x, **kw: calls.append(fn.__self__) or checkpoint(fn, i, x, **kw))
    model = DAT(arch=arch, with_cp=True, frozen_stages=frozen_stages)
    model.train()
    sum(f.sum() for f in model(torch.randn(1, 3, 64, 64))).backward()
    trained = model.stages[max(frozen_stages, 0):]
    assert [stage for stage in model.stages if stage in calls] == list(trained)
    assert len(calls) == sum(len(stage.attns) for stage in trained)
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert not calls, 'nothing to save memory for without autograd'


def test_checkpointing_gives_the_same_outputs_and_gradients(arch):
    torch.manual_seed(0)
    plain = DAT(arch=arch, drop_path_rate=0.0)
    plain.init_weights()
    ckpt = DAT(arch=arch, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        model.train()
        feats = model(x)
        sum((f * f).sum() for f in feats).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(plain(x), ckpt(x)):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


@pytest.mark.compat
@pytest.mark.parametrize('name', ['v1', 'pp'])
def test_bf16_autocast_stays_close_to_fp32(name):
    model, bundle = golden_model(name, torch.float32)
    x = bundle['cases']['224x224_b2']['input'].float()
    with torch.no_grad():
        ref, ref_points = model(x, return_points=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low, low_points = model(x, return_points=True)
    for a, b in zip(low, ref):
        assert a.dtype == torch.bfloat16
        assert rel_err(a.float(), b) < 0.1
    # Sampling coordinates never leave fp32.
    deformable = [p for stage in low_points for p in stage if p is not None]
    assert deformable and all(p[0].dtype == torch.float32 for p in deformable)


@pytest.mark.parametrize('name', ['v1', 'pp'])
def test_fp16_autocast_is_finite_at_detection_resolution(name):
    """The AMP recipes train in fp16. At 800x1216 the deformable blocks' query grids are finest, and an
    image normalised as the data preprocessor does has values up to about +-2.6. The loss is scaled by
    2^16, the initial scale of AMP's dynamic loss scaling (without it, small bias-table gradients underflow
    fp16): nothing may overflow at that scale."""
    torch.manual_seed(0)
    model = DAT(arch=mini_arch(name), with_cp=True)
    model.init_weights()
    model.train()
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 800), torch.linspace(0, 1, 1216), indexing='ij')
    pixels = torch.stack([255 * rows, 255 * cols, 255 * (rows * cols > 0.25)])   # ramps and an edge
    x = ((pixels - mean[:, None, None]) / std[:, None, None])[None]
    with torch.autocast('cpu', dtype=torch.float16):
        feats, points = model(x, return_points=True)
        loss = sum(f.float().square().mean() for f in feats)
    (loss * 2.0 ** 16).backward()
    assert all(f.dtype == torch.float16 and torch.isfinite(f).all() for f in feats)
    deformable = [p for stage in points for p in stage if p is not None]
    assert deformable and all(p[0].dtype == torch.float32 for p in deformable)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
