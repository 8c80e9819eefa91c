"""DAT / DAT++ backbones for MMDetection and MMSegmentation.

Importing this package registers ``dat_mm.DAT`` in MMEngine's registry tree and allow-lists the few types
MMEngine writes into checkpoints, so that resuming works under torch's ``weights_only`` loading.
"""
from .checkpoint import register_safe_globals
from .models import DAT
from .registry import MODELS

__version__ = '0.1.0'
__all__ = ['DAT', 'MODELS']

register_safe_globals()
