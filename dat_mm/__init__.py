"""DAT / DAT++ backbones for MMDetection and MMSegmentation.

Importing this package registers ``dat_mm.DAT`` and the compile hooks in MMEngine's registry tree
and allow-lists the few types MMEngine writes into checkpoints, so that resuming works under torch's
``weights_only`` loading.
"""
import warnings

import torch

from .version import __version__, check_torch

check_torch(torch.__version__)   # before anything that calls newer torch APIs

# mmengine 0.10.7 imports pkg_resources afresh (importlib.reload) each time it resolves an mmdet:: or mmseg::
# base config, and the setuptools < 81 that the stack needs (mmcv's build, mmengine, mim) says on every such
# import that pkg_resources will go: the same notice once per config read, which no user can act on. Only
# that notice is hidden.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)

from .checkpoint import register_safe_globals  # noqa: E402
from .models import DAT  # noqa: E402
from .optim import dat_custom_keys  # noqa: E402,F401  (DAT's weight-decay rule for paramwise_cfg.custom_keys)
from .registry import MODELS  # noqa: E402
# Registered for mmdet's and mmseg's own train tools.
from .runner import EagerOptimizerStepHook, InductorSymbolicSizesHook  # noqa: E402

__all__ = ['DAT', 'EagerOptimizerStepHook', 'InductorSymbolicSizesHook', 'MODELS', '__version__']

register_safe_globals()
