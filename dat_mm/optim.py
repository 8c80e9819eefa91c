"""DAT's weight-decay rule as ``paramwise_cfg.custom_keys``, for any mmdet or mmseg config.

The DAT++ authors train without weight decay on norm layers and on the relative position bias tables. MMEngine's
``DefaultOptimWrapperConstructor`` applies, to each parameter, the one custom key that is the longest substring of
its name. Where a config also sets ``'backbone': dict(lr_mult=0.1)`` (DINO, Mask2Former), that key is longer than
``'norm'`` and wins for the backbone's norms, which then keep their decay, while ``'rpe_table'`` is longer than
``'backbone'`` and wins for the tables, which then lose the backbone's LR factor. With ``backbone_lr_mult`` set,
:func:`dat_custom_keys` therefore also names the backbone's no-decay parameters by their full paths, each with
both settings.

Use it from a config whose first statement is ``_base_ = ...`` (MMEngine then reads the file as a plain config
and runs its imports; an import before ``_base_`` makes it a "lazy import" config, which takes no
``mmdet::`` bases)::

    _base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
    from dat_mm.optim import dat_custom_keys
    optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dat_custom_keys('tiny++', backbone_lr_mult=0.1)))
"""
import functools
from typing import Optional, Tuple, Union

# Substrings of parameter names that train without weight decay (the DAT++ authors' list; the last two are
# Swin's names, which DAT v1's window attention keeps).
NO_DECAY_KEYS: Tuple[str, ...] = ('norm', 'rpe_table', 'relative_position_bias_table', 'absolute_pos_embed')


def _no_decay(name: str) -> bool:
    return any(key in name for key in NO_DECAY_KEYS)


@functools.lru_cache(maxsize=None)
def _backbone_keys(arch: Union[str, tuple], prefix: str) -> Tuple[str, ...]:
    """Name fragments that cover exactly the no-decay parameters of a DAT of this arch (a name, or a dict's
    items): a module whose parameters are all no-decay as one key (``backbone.stages.0.layer_norms.``), else
    its parameters one by one."""
    from .models import DAT
    model = DAT(arch=arch if isinstance(arch, str) else dict(arch))
    keys = []

    def visit(module, path: str) -> None:
        names = [n for n, _ in module.named_parameters()]
        if names and all(_no_decay(f'{path}.{n}') for n in names):
            keys.append(f'{path}.')
            return
        for name, _ in module.named_parameters(recurse=False):
            if _no_decay(f'{path}.{name}'):
                keys.append(f'{path}.{name}')
        for name, child in module.named_children():
            visit(child, f'{path}.{name}')

    visit(model, prefix)
    return tuple(keys)


def dat_custom_keys(arch: Optional[Union[str, dict]] = None, backbone_lr_mult: float = 1.0,
                    prefix: str = 'backbone') -> dict:
    """``custom_keys`` that train DAT's norms and bias tables without weight decay.

    Args:
        arch: the backbone's ``arch`` (a name such as ``'tiny++'`` or a dict); needed with ``backbone_lr_mult``.
        backbone_lr_mult: the LR factor of the whole backbone, as the config's own ``'backbone'`` key sets it
            (0.1 in mmdet's and mmseg's DINO and Mask2Former configs). 1.0: the name rule alone.
        prefix: the backbone's path in the model.

    Returns:
        ``{'norm': dict(decay_mult=0.), 'rpe_table': ..., ...}``, the rule every config of this package uses;
        with ``backbone_lr_mult != 1`` also ``{prefix: dict(lr_mult=m)}`` and one key per no-decay part of the
        backbone with ``dict(lr_mult=m, decay_mult=0.)``.
    """
    keys = {key: dict(decay_mult=0.) for key in NO_DECAY_KEYS}
    if backbone_lr_mult == 1.0:
        return keys
    if arch is None:
        raise ValueError('dat_custom_keys: pass the backbone arch with backbone_lr_mult, e.g. '
                         "dat_custom_keys('tiny++', backbone_lr_mult=0.1)")
    if not isinstance(arch, str):   # hashable, for the cache
        arch = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(dict(arch).items()))
    keys[prefix] = dict(lr_mult=backbone_lr_mult)
    for key in _backbone_keys(arch, prefix):
        keys[key] = dict(lr_mult=backbone_lr_mult, decay_mult=0.)
    return keys
