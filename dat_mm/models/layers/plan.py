"""How the attention layers run: which execution plan, and the index tensors that depend on map sizes alone.

Two plans compute the same numbers:

- ``'cpu'``: loops over small blocks of queries (deformable attention) and rows of tiles (neighborhood
  attention), sized for a few CPU cores' caches. On a GPU each op of such a loop is a kernel launch, tens of
  thousands per training step.
- ``'device'``: each attention layer as a handful of whole-tensor ops, looping over query chunks only where
  one deformable layer's (queries, keys) tensors would pass the attention budget (below). No op reads a
  tensor's value back to the host, and the backbone compiles into one graph (``torch.compile(fullgraph=True)``).

``DAT_MM_ATTENTION_BUDGET_MB`` (default 2048) bounds what one chunk of a deformable layer holds at once of
tensors that grow with queries x keys, in either pass and either plan: the bias, the sampling grid, the bias's
copy in q's dtype, the probabilities P, dS and the lookup's gradient buffers. With the default, stage 1 of DAT-T++
at 1344x800, batch 2, attends in 2 chunks per pass, each holding at most 1.7 GB; lower it on a small GPU.

CUDA runs the device plan, CPU the cpu plan; ``DAT_MM_ATTENTION_PLAN=device|cpu`` forces one on any device,
so that the GPU's code path can be tested and its ops counted on a CPU.
"""
import os
from collections import OrderedDict
from typing import Callable

import torch

from ...compat import is_compiling

PLAN_VARIABLE = 'DAT_MM_ATTENTION_PLAN'
BUDGET_VARIABLE = 'DAT_MM_ATTENTION_BUDGET_MB'
PLANS = ('cpu', 'device')


def attention_plan(device: torch.device) -> str:
    """'cpu' or 'device': the forced plan, else the one for ``device``."""
    forced = os.environ.get(PLAN_VARIABLE, '')
    if forced:
        if forced not in PLANS:
            raise ValueError(f'{PLAN_VARIABLE}={forced!r}: expected one of {PLANS}')
        return forced
    return 'cpu' if device.type == 'cpu' else 'device'


def attention_budget_bytes() -> int:
    """The most that one chunk of a deformable layer holds at once in (queries, keys) transients, in bytes."""
    name = BUDGET_VARIABLE
    value = os.environ.get(name, '2048')
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if megabytes <= 0:
        raise ValueError(f'{name}={value!r}: expected a positive number of megabytes')
    return int(megabytes * 2 ** 20)


# Index tensors keyed by the sizes (and device) they were built for. Bounded: multi-scale training meets
# a new map size at almost every step, and the largest entries (stage 1 of a detection image) hold a few MB.
_CACHE: 'OrderedDict[tuple, object]' = OrderedDict()
CACHE_ENTRIES = 64


def ceil_div(n, d: int):
    """ceil(n / d) for n >= 0, also where n is a traced size: ONNX's integer Div truncates, so -(-n // d) would
    come out as floor(n / d) in an exported graph; and on symbolic sizes (torch.compile) it leaves no modulo,
    whose PythonMod torch 2.13's AOT pass for float scalars cannot translate."""
    return (n + d - 1) // d


def size_cached(build: Callable, *key):
    """``build(*key)``, built once per key in eager mode, so that index tensors that depend only on sizes
    cost no ops and no host work on later calls. Under ``torch.compile`` the build is traced instead: the
    compiler folds it into the graph (or, on symbolic sizes, computes it there); under an ONNX export's trace
    too, where the sizes are traced values that keep the graph's input size dynamic."""
    if is_compiling() or torch.jit.is_tracing():
        return build(*key)
    full_key = (build, *key)
    if full_key in _CACHE:
        _CACHE.move_to_end(full_key)
        return _CACHE[full_key]
    # Normal tensors even when the first call comes under inference_mode: a training step may save them.
    with torch.inference_mode(False), torch.no_grad():
        value = build(*key)
    _CACHE[full_key] = value
    if len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return value
