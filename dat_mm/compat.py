"""The torch features dat_mm uses beyond its floor (torch 2.1, :mod:`dat_mm.version`), each looked up here once.

Code elsewhere asks this module instead of calling a newer API itself. A feature this torch lacks is off, never
an error; where users lose something by it, the caller logs one line saying what. Run
``python -m dat_mm.compat`` to see what the installed torch offers (docs/installation.md#torch-versions).
"""
from typing import Any, Callable, Dict, Optional

import torch
from torch.fx.experimental import symbolic_shapes as _symbolic_shapes

# torch.compiler.is_compiling came in torch 2.3; torch._dynamo's, which Dynamo also treats as a constant, before.
if hasattr(torch.compiler, 'is_compiling'):
    is_compiling: Callable[[], bool] = torch.compiler.is_compiling
else:  # pragma: no cover - torch < 2.3
    from torch._dynamo import is_compiling  # noqa: F401

# symbolic_shapes.statically_known_true, traced by Dynamo in user code from torch 2.8 (which added has_static_value
# with it): whether a condition on sizes holds, answered without adding a guard. Before, nothing counts as known,
# and compiled graphs lay the neighborhood attention out for symbolic sizes even where sizes are static.
traces_size_facts = hasattr(_symbolic_shapes, 'has_static_value')
if traces_size_facts:
    statically_known_true: Callable[[Any], bool] = _symbolic_shapes.statically_known_true
else:  # pragma: no cover - torch < 2.8
    def statically_known_true(condition: Any) -> bool:
        return False

# torch.library.register_fake (2.4): output shapes of the CPU kernels, without which torch.compile cannot trace them.
register_fake: Optional[Callable] = getattr(torch.library, 'register_fake', None)

# torch.serialization.add_safe_globals (2.4): the allow-list of torch.load(weights_only=True), which is the default
# from torch 2.6 on. Before 2.6 torch.load reads MMEngine's checkpoints without one.
add_safe_globals: Optional[Callable] = getattr(torch.serialization, 'add_safe_globals', None)


def features() -> Dict[str, bool]:
    """What this torch offers of the features above."""
    return {
        'CPU kernels under torch.compile (torch.library.register_fake)': register_fake is not None,
        'weights_only allow-list for MMEngine checkpoints (torch.serialization.add_safe_globals)':
            add_safe_globals is not None,
        'static compiled graphs tile as eager code does (statically_known_true under Dynamo)': traces_size_facts,
    }


def main() -> None:
    print(f'torch {torch.__version__}')
    for name, present in features().items():
        print(f'  {"yes" if present else "no ":3}  {name}')


if __name__ == '__main__':
    main()
