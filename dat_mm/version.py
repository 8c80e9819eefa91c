"""The package version, and the oldest torch it runs on."""
import re

__version__ = '0.1.0'

# The model needs scaled_dot_product_attention's scale argument, new in torch 2.1, the newest torch that
# OpenMMLab's prebuilt mmcv 2.1 wheels cover. Newer features are optional (dat_mm/compat.py). setup.py declares
# the same floor.
TORCH_MINIMUM = (2, 1)


def check_torch(version: str) -> None:
    """Stops with one clear message where ``version`` (torch.__version__) is older than :data:`TORCH_MINIMUM`."""
    found = re.match(r'(\d+)\.(\d+)', version)
    if found and tuple(int(part) for part in found.groups()) < TORCH_MINIMUM:
        need = '.'.join(map(str, TORCH_MINIMUM))
        raise ImportError(f'dat_mm needs torch >= {need}, and this environment has torch {version}. Install a newer '
                          f'torch (and an mmcv 2.1 built for it), e.g. pip install "torch>={need}".')
