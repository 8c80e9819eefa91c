"""The ``dat_mm`` scope of MMEngine's registry tree.

As mmpretrain does for backbones shared across OpenMMLab libraries, our registry is a child of
MMEngine's root ``MODELS``; mmdet and mmseg configs then build the backbone with
``type='dat_mm.DAT'`` after ``custom_imports=dict(imports=['dat_mm'])``.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='dat_mm', locations=['dat_mm.models'])
