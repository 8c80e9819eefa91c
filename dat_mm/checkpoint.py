"""Checkpoint helpers: the authors' checkpoints into our backbone, and MMEngine checkpoints under torch >= 2.6."""
import _compat_pickle
import collections
import functools
import os
import pickle
import re
import types
from collections import OrderedDict
from typing import Any, BinaryIO, Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .compat import add_safe_globals

# Buffers that are pure functions of the window size: checkpoints may carry them, we recompute them.
RECOMPUTED_BUFFERS = ('relative_position_index', 'attn_mask')
# Classification-only weights of the authors' ImageNet models.
CLASSIFIER_PREFIXES = ('cls_head.', 'cls_norm.', 'head.', 'fc.')
BIAS_TABLES = ('rpe_table', 'relative_position_bias_table', 'rpb')
WRAPPER_KEYS = ('state_dict', 'model', 'module')


def _history_buffer_state(self) -> dict:
    # MMEngine pickles the statistic functions of every buffer (as getattr(HistoryBuffer, name)); they are
    # class-level registrations restored at import, and getattr cannot be allow-listed safely.
    return {k: v for k, v in self.__dict__.items() if k != 'statistics_methods'}


def register_safe_globals() -> None:
    """Make checkpoints written by MMEngine loadable with ``torch.load(weights_only=True)`` (torch >= 2.6).

    MMEngine 0.10 stores its message hub (``HistoryBuffer`` objects holding numpy arrays) and numpy scalars;
    these few plain-data types are allow-listed, nothing else is, and the ``weights_only`` safety stays on.
    ``HistoryBuffer`` is also made to pickle without its statistic functions, which only ``getattr`` could
    restore. Checkpoints saved by a plain MMEngine run before this import still carry them.
    """
    from mmengine.logging import HistoryBuffer
    HistoryBuffer.__getstate__ = _history_buffer_state
    if add_safe_globals is not None:   # torch < 2.4 has none, and before 2.6 does not need one
        add_safe_globals([HistoryBuffer, *_numpy_globals().values()])


def _numpy_globals() -> Dict[str, Any]:
    """The numpy types and functions that rebuild arrays, scalars and dtypes, by the names pickles give them."""
    import numpy as np
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                                  np.int8, np.uint8, np.bool_)]
    found = {}
    for value in (_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes):
        found[f'{value.__module__}.{value.__name__}'] = value
        # numpy 1 pickles under numpy.core, numpy 2 under numpy._core; either file may meet either numpy.
        for old, new in (('numpy._core', 'numpy.core'), ('numpy.core', 'numpy._core')):
            if value.__module__.startswith(old + '.'):
                found[new + value.__module__[len(old):] + '.' + value.__name__] = value
    return found


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a Python object that is not plain data; its name is in the message."""


# What the checkpoints that users have hold besides tensors: the authors' ImageNet training pickles its yacs
# config (a CfgNode, a dict subclass) and the optimizer's and scheduler's states; mmdet 2 / mmseg 0 keep mmcv 1's
# meta (class names, palette, config text, hook messages, numpy scalars); MMEngine its message hub.
# Config objects come back as OrderedDicts, so yacs need not be installed and no code of it runs.
PLAIN_DATA_STAND_INS = {'yacs.config.CfgNode': OrderedDict}


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> Dict[str, Any]:
    from mmengine.logging import HistoryBuffer
    allowed = {
        'collections.OrderedDict': OrderedDict, 'collections.defaultdict': collections.defaultdict,
        'builtins.set': set, 'builtins.frozenset': frozenset, 'builtins.slice': slice, 'builtins.complex': complex,
        '_codecs.encode': __import__('codecs').encode,   # how protocol 2 writes bytes (numpy scalars)
        'torch.Size': torch.Size, 'torch.device': torch.device, 'torch.nn.parameter.Parameter': nn.Parameter,
        'torch.serialization._get_layout': torch.serialization._get_layout,
        'torch._tensor._rebuild_from_type_v2': torch._tensor._rebuild_from_type_v2,
        'mmengine.logging.history_buffer.HistoryBuffer': HistoryBuffer,
        **_numpy_globals(), **PLAIN_DATA_STAND_INS,
    }
    for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_parameter', '_rebuild_parameter_with_state',
                 '_rebuild_meta_tensor_no_storage'):
        if hasattr(torch._utils, name):
            allowed[f'torch._utils.{name}'] = getattr(torch._utils, name)
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[str(value)] = value
    return allowed


class _PlainDataUnpickler(pickle._Unpickler):
    """Builds only the types above: a pickle reaches code through the globals it names, and sets state (BUILD)
    on what they built, so an allow-list of harmless globals, whose classes take state only on their instances,
    makes the whole file safe to read, on every torch version alike. Python's own unpickler, whose opcodes can
    be overridden; the pickled part of a checkpoint is small beside its tensors."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2, torch.save's, writes Python 2's names (__builtin__.set); pickle's own find_class maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _allowed_globals().get(f'{module}.{name}')
        if found is None:
            raise UnsafeCheckpointError(f'{module}.{name}')
        return found

    def load_build(self) -> None:
        target = self.stack[-2]   # under the state that BUILD pops
        # State set on a class or a function would change it for the whole process.
        if isinstance(target, type) or callable(target):
            raise UnsafeCheckpointError(f'state set on {getattr(target, "__qualname__", type(target).__name__)}')
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


# What torch.load takes as its pickle module: the legacy file format also calls its load() for the header.
_RESTRICTED_PICKLE = types.ModuleType('dat_mm_plain_data_pickle')
_RESTRICTED_PICKLE.Unpickler = _PlainDataUnpickler
_RESTRICTED_PICKLE.load = lambda f, **kwargs: _PlainDataUnpickler(f, **kwargs).load()
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError


def read_checkpoint(file: Union[str, os.PathLike, BinaryIO]) -> Any:
    """``torch.load`` of a checkpoint file onto the CPU, reading tensors and plain data only.

    Loads the checkpoints users have as their tools wrote them (see ``PLAIN_DATA_STAND_INS``); anything else
    that a pickle would construct or call raises :class:`UnsafeCheckpointError` naming it, before any of it runs.
    The same reader serves every torch from 2.1, whose own ``weights_only`` reader knows none of these types.
    """
    # weights_only=False because this module is the restriction; torch refuses a pickle_module beside its own.
    return torch.load(file, map_location='cpu', pickle_module=_RESTRICTED_PICKLE, weights_only=False)


def unwrap_state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: handles 'state_dict' / 'model' wrappers and 'module.' prefixes."""
    state = checkpoint
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        wrapper = next((k for k in WRAPPER_KEYS if k in state), None)
        if wrapper is None:
            raise KeyError(f'No weights found in checkpoint; top-level keys: {sorted(state)[:10]}')
        state = state[wrapper]
    return OrderedDict((re.sub(r'^module\.', '', k), v) for k, v in state.items() if torch.is_tensor(v))


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    # Whole detectors / segmentors keep the backbone under 'backbone.'; the rest (neck, heads) is dropped.
    if prefix is None:
        prefix = 'backbone.' if any(k.startswith('backbone.') for k in state) else ''
    if not prefix:
        return state
    kept = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
    if not kept:
        raise KeyError(f'No key of the checkpoint starts with {prefix!r}')
    return kept


def resize_bias_table(name: str, table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubically resizes a relative position bias table to ``shape``."""
    if name.endswith('relative_position_bias_table'):   # ((2w-1)^2, heads)
        src, dst = int(table.shape[0] ** 0.5), int(shape[0] ** 0.5)
        grid = table.T.reshape(1, -1, src, src)
        return F.interpolate(grid.float(), size=(dst, dst), mode='bicubic', align_corners=True
                             ).to(table.dtype).reshape(-1, dst * dst).T
    # rpe_table / rpb: (heads, h, w)
    return F.interpolate(table[None].float(), size=tuple(shape[1:]), mode='bicubic', align_corners=True
                         )[0].to(table.dtype)


def _short(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def adapt_state_dict(model: nn.Module, state: Dict[str, torch.Tensor],
                     prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Maps a checkpoint's tensors onto ``model``'s state dict.

    Drops classifier weights and recomputable buffers, resizes bias tables whose size differs, and raises a
    ``ValueError`` that names the offending keys if anything else is missing, unexpected or mis-shaped
    (the output norms, which no classification checkpoint has, may be missing).
    """
    state = _strip_prefix(state, prefix)
    own = model.state_dict()
    adapted, unexpected, mismatched = OrderedDict(), [], []
    for key, value in state.items():
        if key.startswith(CLASSIFIER_PREFIXES) or key.rsplit('.', 1)[-1] in RECOMPUTED_BUFFERS:
            continue
        if key not in own:
            unexpected.append(key)
        elif value.shape != own[key].shape:
            if key.rsplit('.', 1)[-1] in BIAS_TABLES and value.dim() == own[key].dim():
                adapted[key] = resize_bias_table(key, value, own[key].shape)
            else:
                mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            adapted[key] = value
    missing = [k for k in own if k not in adapted and not re.match(r'norm\d\.', k)]
    problems: List[str] = []
    if missing:
        problems.append(f'{len(missing)} missing: {_short(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected: {_short(unexpected)}')
    if mismatched:
        problems.append(f'{len(mismatched)} with another shape: {_short(mismatched, 4)}')
    if problems:
        raise ValueError('Checkpoint does not match this DAT backbone (is it for another arch?): '
                         + '; '.join(problems))
    return adapted


def load_backbone_checkpoint(model: nn.Module, filename: str, prefix: Optional[str] = None) -> None:
    """Loads the authors' (or our) checkpoint into a DAT backbone: see :func:`adapt_state_dict`."""
    from mmengine.logging import print_log
    from mmengine.runner.checkpoint import CheckpointLoader

    if os.path.isfile(filename):
        try:
            checkpoint = read_checkpoint(filename)
        except UnsafeCheckpointError as err:
            raise ValueError(unsafe_message(filename, err)) from None
    else:   # a URL or another storage backend of MMEngine's
        checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    adapted = adapt_state_dict(model, unwrap_state_dict(checkpoint), prefix)
    result = model.load_state_dict(adapted, strict=False)
    print_log(f'Loaded {len(adapted)} tensors from {filename}; left at their initial values: '
              f'{_short(result.missing_keys) or "none"}', logger='current')


def unsafe_message(filename: str, err: UnsafeCheckpointError) -> str:
    return (f'{filename} holds a Python object that is not plain data ({err}); refusing to unpickle it. '
            'Re-save its state dict alone from a trusted process: torch.save(torch.load(FILE)["model"], OUT)')
