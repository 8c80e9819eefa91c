"""Deformable Attention Transformer backbones: DAT (CVPR 2022) and DAT++.

Module and parameter names follow the authors' code, so their ImageNet checkpoints load without a key map.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, initialize, trunc_normal_init
from torch import nn

from ...checkpoint import load_backbone_checkpoint
from ...compat import is_compiling
from ...registry import MODELS
from ..layers import (ConvFFN, DeformableAttention, LayerNorm2d, Mlp, NeighborhoodAttention,
                      WindowAttention)
from ..layers.plan import ceil_div

# Per stage, ``blocks`` is a pattern repeated over the stage's depth: 'L' window, 'S' shifted window,
# 'N' neighborhood, 'D' deformable attention. ``groups`` are the offset groups of 'D' blocks.
ARCH_SETTINGS: Dict[str, dict] = {
    'tiny': dict(version=1, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                 groups=(1, 1, 3, 6), blocks=('LS', 'LS', 'LD', 'LD')),
    'small': dict(version=1, dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                  groups=(1, 1, 3, 6), blocks=('LS', 'LS', 'LD', 'LD')),
    'base': dict(version=1, dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                 groups=(1, 1, 4, 8), blocks=('LS', 'LS', 'LD', 'LD')),
    'tiny++': dict(version=2, dims=(64, 128, 256, 512), depths=(2, 4, 18, 2), heads=(2, 4, 8, 16),
                   groups=(1, 2, 4, 8), blocks=('ND', 'ND', 'ND', 'DD')),
    'small++': dict(version=2, dims=(96, 192, 384, 768), depths=(2, 4, 18, 2), heads=(3, 6, 12, 24),
                    groups=(1, 2, 3, 6), blocks=('ND', 'ND', 'ND', 'DD')),
    'base++': dict(version=2, dims=(128, 256, 512, 1024), depths=(2, 4, 18, 2), heads=(4, 8, 16, 32),
                   groups=(2, 4, 8, 16), blocks=('ND', 'ND', 'ND', 'DD')),
}

# What distinguishes the two families beyond their sizes. v1 'D' blocks use a stride-1 grid;
# DAT++ samples a grid of stride 8/4/2/1, i.e. the same ceil(H/32) x ceil(W/32) keys in every stage.
FAMILY_DEFAULTS = {
    1: dict(strides=(1, 1, 1, 1), offset_kernels=(9, 7, 5, 3), offset_range_factor=2.0),
    2: dict(strides=(8, 4, 2, 1), offset_kernels=(9, 7, 5, 3), offset_range_factor=-1.0),
}
ARCH_KEYS = {'version', 'dims', 'depths', 'heads', 'groups', 'blocks'}


def resolve_arch(arch: Union[str, dict], deform_strides: Optional[Sequence[int]] = None) -> dict:
    """A full arch dict from a preset name or a custom dict (which may override the family defaults);
    ``deform_strides`` replaces its ``strides``."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise KeyError(f'Unknown DAT arch {arch!r}; choose one of {sorted(ARCH_SETTINGS)} or pass a dict')
        arch = ARCH_SETTINGS[arch]
    missing = ARCH_KEYS - set(arch)
    if missing:
        raise KeyError(f'Custom DAT arch lacks {sorted(missing)}; it needs {sorted(ARCH_KEYS)}')
    if arch['version'] not in FAMILY_DEFAULTS:
        raise ValueError(f"arch version must be 1 (DAT) or 2 (DAT++), got {arch['version']}")
    full = {**FAMILY_DEFAULTS[arch['version']], **copy.deepcopy(dict(arch))}
    if deform_strides is not None:
        full['strides'] = tuple(deform_strides)
    unknown = set(full) - ARCH_KEYS - set(FAMILY_DEFAULTS[1])
    if unknown:
        raise KeyError(f'Unknown DAT arch keys {sorted(unknown)}')
    for key in ('dims', 'depths', 'heads', 'groups', 'blocks', 'strides', 'offset_kernels'):
        if len(full[key]) != 4:
            raise ValueError(f'arch {key!r} needs one entry per stage (4), got {full[key]}')
    if not all(isinstance(s, int) and s >= 1 for s in full['strides']):
        raise ValueError(f"deformable strides must be integers >= 1, got {full['strides']}")
    allowed = set('LSD') if full['version'] == 1 else set('ND')
    for pattern in full['blocks']:
        if not pattern or set(pattern) - allowed:
            raise ValueError(f"DAT v{full['version']} block patterns use {sorted(allowed)}, got {pattern!r}")
    return full


def _split_init_cfg(init_cfg) -> Tuple[List[dict], List[dict]]:
    """([the 'Pretrained' entry], [the other initialisers]) of an ``init_cfg`` (None, a dict or a list)."""
    cfgs = list(init_cfg) if isinstance(init_cfg, (list, tuple)) else [init_cfg] if init_cfg else []
    if not all(isinstance(cfg, dict) and 'type' in cfg for cfg in cfgs):
        raise TypeError(f'init_cfg must be a dict with a type, or a list of such dicts; got {init_cfg!r}')
    pretrained = [cfg for cfg in cfgs if cfg['type'] == 'Pretrained']
    if len(pretrained) > 1:
        raise ValueError(f'init_cfg holds {len(pretrained)} Pretrained entries; give one checkpoint')
    if pretrained and 'checkpoint' not in pretrained[0]:
        raise ValueError("init_cfg's Pretrained entry needs a checkpoint")
    return pretrained, [cfg for cfg in cfgs if cfg['type'] != 'Pretrained']


def _residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, added into the branch's output where autograd records nothing: a new map costs its first
    touch (page faults). Under autograd the branch is often a view (a permuted linear output), and an
    in-place add to a view adds copies to the backward. Under autocast the two may differ in dtype, where
    x + branch promotes and an in-place add would not."""
    if x.requires_grad or branch.requires_grad or x.dtype != branch.dtype:
        return x + branch
    return branch.add_(x)


class DATStage(nn.Module):
    """One stage: ``depth`` residual blocks, x = x + attn(LN(x)); x = x + MLP(LN(x)).

    DAT++ blocks start with a local perception unit, x = x + DWConv3x3(x).
    """

    def __init__(self, version: int, channels: int, depth: int, num_heads: int, groups: int,
                 pattern: str, stride: int, offset_kernel: int, offset_range_factor: float,
                 table_size: Tuple[int, int], drop_path: Sequence[float], with_cp: bool,
                 reference_attention: bool) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.block_types = [pattern[i % len(pattern)] for i in range(depth)]
        self.layer_norms = nn.ModuleList(LayerNorm2d(channels) for _ in range(2 * depth))
        attns = []
        for kind in self.block_types:
            if kind == 'D':
                attns.append(DeformableAttention(channels, num_heads, groups, stride, offset_kernel,
                                                 offset_range_factor, table_size, version, reference_attention))
            elif kind == 'N':
                attns.append(NeighborhoodAttention(channels, num_heads, reference=reference_attention))
            else:
                attns.append(WindowAttention(channels, num_heads, shifted=kind == 'S'))
        self.attns = nn.ModuleList(attns)
        mlp = Mlp if version == 1 else ConvFFN
        self.mlps = nn.ModuleList(mlp(channels) for _ in range(depth))
        if version == 2:
            self.local_perception_units = nn.ModuleList(
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels) for _ in range(depth))
        else:
            self.local_perception_units = None
        self.drop_paths = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)

    def _block(self, i: int, x: torch.Tensor):
        if self.local_perception_units is not None:
            x = _residual(x, self.local_perception_units[i](x))
        out = self.attns[i](self.layer_norms[2 * i](x))
        points = None
        if isinstance(out, tuple):
            out, *points = out
        x = _residual(x, self.drop_paths[i](out))
        x = _residual(x, self.drop_paths[i](self.mlps[i](self.layer_norms[2 * i + 1](x))))
        return x, points

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[Optional[List[torch.Tensor]]]]:
        """x: (B, C, H, W). Returns (B, C, H, W) and, per block, [positions, references] of a 'D' block
        (each (B, groups, Hk, Wk, 2)) or None."""
        points = []
        # Whether the input needs a gradient does not matter: behind frozen stages (or the frozen stem) it does
        # not, and the stage's own activations are what checkpointing saves.
        checkpointed = self.with_cp and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        for i in range(len(self.attns)):
            if checkpointed:
                x, block_points = cp.checkpoint(self._block, i, x, use_reentrant=False)
            else:
                x, block_points = self._block(i, x)
            points.append(block_points)
        return x, points


@MODELS.register_module()
class DAT(BaseModule):
    """Deformable Attention Transformer backbone (DAT v1 and DAT++) for dense prediction.

    Args:
        arch: a preset name ('tiny', 'small', 'base' for DAT; 'tiny++', 'small++', 'base++' for DAT++) or a
            dict with keys ``version`` (1 or 2), ``dims``, ``depths``, ``heads``, ``groups``, ``blocks``, and
            optionally ``strides``, ``offset_kernels``, ``offset_range_factor``.
        in_channels: input image channels.
        pretrain_img_size: image size of the pre-training; sets the size of the deformable bias tables
            (the tables are sampled in normalised coordinates, so any input size works at run time).
        out_indices: stages whose outputs are returned, each after its own LayerNorm.
        frozen_stages: freeze the stem and stages ``0 .. frozen_stages - 1`` (-1: nothing frozen).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        with_cp: activation checkpointing (non-reentrant) of every block while training.
        deform_strides: per stage, the stride of the grid the deformable blocks sample keys on, in place of
            the arch's (DAT: 1, 1, 1, 1; DAT++: 8, 4, 2, 1). No parameter depends on it, so ImageNet weights
            load under any strides. The DAT v1 dense-prediction configs use (1, 1, 2, 1); see docs/v1_sampling_stride.md.
        reference_attention: run the plain deformable and neighborhood attention, which hold every
            (query, key) tensor of a block at once; same numbers, slower, much more memory. For checks.
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint='dat_pp_tiny_in1k_224.pth')``; the authors'
            ImageNet checkpoints load as they are (see :func:`dat_mm.checkpoint.load_backbone_checkpoint`).
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny++',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 drop_path_rate: float = 0.0,
                 with_cp: bool = False,
                 deform_strides: Optional[Sequence[int]] = None,
                 reference_attention: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        _split_init_cfg(init_cfg)   # a malformed init_cfg fails here, not when the runner initialises
        super().__init__(init_cfg=init_cfg)
        self.arch = resolve_arch(arch, deform_strides)
        self.version = self.arch['version']
        dims = self.arch['dims']
        self.in_channels = in_channels
        out_indices = tuple(out_indices)
        if not out_indices or any(not isinstance(i, int) or not -4 <= i < 4 for i in out_indices):
            raise ValueError(f'out_indices must be stages 0..3 (or -4..-1, counted from the last), got {out_indices}')
        self.out_indices = tuple(sorted(i % 4 for i in out_indices))
        if len(set(self.out_indices)) != len(out_indices):
            raise ValueError(f'out_indices must be distinct stages, got {out_indices}')
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be in -1..4, got {frozen_stages}')
        self.frozen_stages = frozen_stages

        if self.version == 1:
            self.patch_proj = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0]))
        else:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_channels, dims[0] // 2, 3, 2, 1), LayerNorm2d(dims[0] // 2), nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNorm2d(dims[0]))

        depths = self.arch['depths']
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            side = pretrain_img_size // (4 * 2 ** i)
            self.stages.append(DATStage(
                self.version, dims[i], depths[i], self.arch['heads'][i], self.arch['groups'][i],
                self.arch['blocks'][i], self.arch['strides'][i], self.arch['offset_kernels'][i],
                self.arch['offset_range_factor'], (side, side),
                rates[sum(depths[:i]):sum(depths[:i + 1])], with_cp, reference_attention))
        kernel, padding = (2, 0) if self.version == 1 else (3, 1)
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], kernel, 2, padding, bias=False),
                          LayerNorm2d(dims[i + 1]))
            for i in range(3))
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(dims[i]))
        self.num_features = [dims[i] for i in self.out_indices]
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_proj]
        for i in range(self.frozen_stages):
            modules.append(self.stages[i])
            if i > 0:
                modules.append(self.down_projs[i - 1])
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'DAT':
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """As MMEngine's ``BaseModule``, ``init_cfg`` may be one dict or a list of them; a 'Pretrained' entry is
        applied last, over the others, and loads the authors' checkpoints as they are
        (:func:`dat_mm.checkpoint.load_backbone_checkpoint`). Without ``init_cfg``: truncated-normal weights
        (std 0.02) and bias tables, as the authors initialise."""
        pretrained, others = _split_init_cfg(self.init_cfg)
        if others:
            initialize(self, others)
        elif not pretrained:
            self._default_init()
        if pretrained:
            load_backbone_checkpoint(self, pretrained[0]['checkpoint'], prefix=pretrained[0].get('prefix'))
        self._is_init = True

    def _default_init(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_init(module, std=0.02, bias=0.0)
            elif isinstance(module, nn.LayerNorm):
                constant_init(module, val=1.0, bias=0.0)
            elif isinstance(module, (DeformableAttention, NeighborhoodAttention, WindowAttention)):
                for name in ('rpe_table', 'rpb', 'relative_position_bias_table'):
                    if hasattr(module, name):
                        nn.init.trunc_normal_(getattr(module, name), std=0.02)

    def forward(self, x: torch.Tensor, return_points: bool = False):
        """x: (B, in_channels, H, W), any H and W.

        Returns a tuple with one normalised (B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) map per entry of
        ``out_indices``. With ``return_points=True``, returns ``(features, points)`` where
        ``points[stage][block]`` is ``[positions, references]`` of a deformable block, each
        (B, groups, Hk, Wk, 2) in (y, x) order in [-1, 1] (``None`` for other blocks).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'DAT expects a (B, {self.in_channels}, H, W) tensor, got {tuple(x.shape)}')
        # DAT v1 patchifies (4x4, stride 4) and merges (2x2, stride 2) without padding: it pads the bottom and
        # right to whole patches first, as mmdet's Swin does, so that no pixel is dropped and every stage covers
        # the image. DAT++'s stride-2 3x3 convolutions pad by themselves.
        x = self.patch_proj(_pad_to_multiple(x, 4) if self.version == 1 else x)
        outs, points = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.down_projs[i - 1](_pad_to_multiple(x, 2) if self.version == 1 else x)
            x, stage_points = stage(x)
            points.append(stage_points)
            if i in self.out_indices:
                # Contiguous NCHW, as mm necks and heads expect: the channel LayerNorm leaves a channels-last
                # layout, which convolutions carry on and which mmcv's RoIAlign reads as NCHW, scrambling the
                # RoI features of every two-stage detector.
                outs.append(getattr(self, f'norm{i}')(x).contiguous())
        return (tuple(outs), points) if return_points else tuple(outs)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x (B, C, H, W) zero-padded at the bottom and right to sides that are multiples of ``multiple``."""
    # Rounded up rather than (-n) % multiple, whose PythonMod the query grid's 2 / n cannot take (see ceil_div).
    pad_h, pad_w = (ceil_div(n, multiple) * multiple - n for n in x.shape[2:])
    # Traced (ONNX: the sizes are tensors) and compiled code pads always, so that no branch fixes the size;
    # eager code skips the copy where there is nothing to pad.
    if isinstance(pad_h, torch.Tensor) or is_compiling() or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x
