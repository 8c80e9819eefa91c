"""The golden data (tests/data/golden, see its README): the authors' reference outputs, and our backbone built
to match them."""
import json
import os
from pathlib import Path

import torch

from dat_mm import DAT

GOLDEN_DIR = Path(os.environ.get('DAT_MM_GOLDEN', Path(__file__).resolve().parent / 'data' / 'golden'))


def load_bundle(name: str) -> dict:
    path = GOLDEN_DIR / f'{name}_mini.pt'
    if not path.exists():
        raise FileNotFoundError(f'{path} not found: the golden data ships in tests/data/golden '
                                '(DAT_MM_GOLDEN points elsewhere)')
    return torch.load(path, weights_only=True)


def arch_from_authors_kwargs(kwargs: dict) -> dict:
    """Our arch dict for the authors' ``DAT(**kwargs)`` constructor arguments."""
    version = 2 if kwargs.get('use_conv_patches') else 1
    arch = dict(version=version, dims=kwargs['dims'], depths=kwargs['depths'], heads=kwargs['heads'],
                groups=[max(g, 1) for g in kwargs['groups']],
                blocks=[''.join(spec) for spec in kwargs['stage_spec']],
                strides=[max(s, 1) for s in kwargs['strides']])
    if 'ksizes' in kwargs:
        arch['offset_kernels'] = kwargs['ksizes']
    factors = {f for f, spec in zip(kwargs['offset_range_factor'], kwargs['stage_spec']) if 'D' in spec}
    assert len(factors) == 1, factors
    arch['offset_range_factor'] = float(factors.pop())
    return arch


def golden_model(name: str, dtype=torch.float64, reference: bool = False) -> tuple:
    """(model in eval mode with the bundle's weights, bundle); ``reference`` selects the plain attention."""
    bundle = load_bundle(name)
    kwargs = json.loads(bundle['kwargs'])
    model = DAT(arch=arch_from_authors_kwargs(kwargs), pretrain_img_size=kwargs['img_size'],
                reference_attention=reference)
    from dat_mm.checkpoint import adapt_state_dict
    model.load_state_dict(adapt_state_dict(model, bundle['state_dict']), strict=False)
    return model.to(dtype).eval(), bundle


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the golden README's measure."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def stage_outputs(model: DAT, x: torch.Tensor, return_points: bool = False):
    """The four stage outputs before the output norms (what the golden files store)."""
    feats = []
    hooks = [model.stages[i].register_forward_hook(lambda m, inp, out: feats.append(out[0])) for i in range(4)]
    try:
        result = model(x, return_points=return_points)
    finally:
        for h in hooks:
            h.remove()
    return (feats, result[1]) if return_points else feats


def loss_weights(outputs) -> list:
    """The fixed weights w_i of the golden gradient cases."""
    return [torch.sin(0.1 * torch.arange(o.numel(), dtype=torch.float64)).reshape(o.shape) for o in outputs]
