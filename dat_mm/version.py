"""The package version, and the oldest torch it runs on."""
import re

__version__ = '0.1.0'

# torch.library.register_fake (the CPU kernels' shapes for torch.compile) and torch.serialization.add_safe_globals
# (MMEngine checkpoints under weights_only loading) first came in torch 2.4. setup.py declares the same floor.
TORCH_MINIMUM = (2, 4)


def check_torch(version: str) -> None:
    """Stops with one clear message where ``version`` (torch.__version__) is older than :data:`TORCH_MINIMUM`."""
    found = re.match(r'(\d+)\.(\d+)', version)
    if found and tuple(int(part) for part in found.groups()) < TORCH_MINIMUM:
        need = '.'.join(map(str, TORCH_MINIMUM))
        raise ImportError(f'dat_mm needs torch >= {need}, and this environment has torch {version}. Install a newer '
                          f'torch (and an mmcv 2.1 built for it), e.g. pip install "torch>={need}".')
