"""Exports a config's DAT backbone to ONNX (opset 17, standard operators only, GridSample included), and
with a segmentor config also the whole segmentor's 'tensor' mode (image -> logits at 1/4 resolution).

    python tools/export_onnx.py configs/det/mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py --shape 320 480 --check
        # -> work_dirs/onnx/mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.onnx
    python tools/export_onnx.py configs/seg/upernet_dat-t++_8xb2-160k_ade20k-512x512.py --checkpoint model.pth \\
        --shape 512 512 --out upernet.onnx        # also writes upernet_segmentor.onnx

Height and width are dynamic in the backbone graph: the attention's shape logic (padding, windows, tiles, key
grids) is traced as arithmetic on the input size. The attention layers trace their device plan in plain ops
(dat_mm/models/layers: ``_attend_tiles_traced``, ``_biased_attention_traced``): neighborhood attention as tiles
of queries attending to their key regions, deformable attention in four parts of the queries, each part's bias
one GridSample, with no loop whose length the export size would fix. They compute the reference's numbers (``--check``). In the
segmentor, adaptive average pooling (UperNet's pyramid pooling), which the exporter converts only for
constant input sizes, is exported as averaging-matrix products built from the size (same windows).
``--check`` compares onnxruntime with the unchanged PyTorch model at the export shape and two others, and
exits 1 if any output differs by more than 1e-4.
Needs the deploy extra: ``pip install onnx onnxruntime`` (``pip install .[deploy]``).
"""
import argparse
import copy
import importlib.util
import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm.runner import build_model  # noqa: E402

OPSET = 17
TOLERANCE = 1e-4


class AdaptiveAvgPoolMatmul(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging-matrix products, built from the input size at run time.

    The ONNX exporter only converts adaptive pooling whose input size is a known constant; this form traces
    as arithmetic on the size, so the pyramid pooling of UperNet exports with dynamic height and width.
    Same windows as PyTorch: output cell i averages input rows floor(i*n/s) .. ceil((i+1)*n/s) - 1.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _weights(n, s: int, x: torch.Tensor) -> torch.Tensor:
        """(s, n) rows that average each output cell's input window."""
        i = torch.arange(s, device=x.device)
        start, stop = i * n // s, ((i + 1) * n + s - 1) // s
        j = torch.arange(n, device=x.device)[None]
        inside = ((j >= start[:, None]) & (j < stop[:, None])).to(x.dtype)
        return inside / (stop - start)[:, None].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, s_h, s_w)."""
        rows = self._weights(x.shape[2], self.output_size[0], x)
        cols = self._weights(x.shape[3], self.output_size[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def replace_adaptive_pooling(module: nn.Module) -> int:
    """Swaps every ``nn.AdaptiveAvgPool2d`` in ``module`` for :class:`AdaptiveAvgPoolMatmul`; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d):
            setattr(module, name, AdaptiveAvgPoolMatmul(child.output_size))
            count += 1
        else:
            count += replace_adaptive_pooling(child)
    return count


class SegmentorTensorMode(nn.Module):
    """An mmseg segmentor's ``mode='tensor'`` forward, image (B, 3, H, W) -> logits (B, classes, H/4, W/4)."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentor(image, None, mode='tensor')


def check_shapes(height: int, width: int) -> List[Tuple[int, int]]:
    """The export shape, its transpose and one whose sides are no multiple of 32 (odd padding everywhere)."""
    shapes = [(height, width), (width, height), (height + 40, width + 72)]
    return list(dict.fromkeys(shapes))


def export(module: nn.Module, shape: Tuple[int, int], out: Path, outputs: List[str]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every shape-dependent Python value; the check below is what tells.
        warnings.simplefilter('ignore')
        # The TorchScript exporter, which dynamic_axes belong to; torch >= 2.5 defaults to another unless told.
        legacy = {'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(module, (torch.randn(1, 3, *shape),), str(out), input_names=['image'],
                          output_names=outputs, opset_version=OPSET, dynamic_axes={'image': {2: 'height', 3: 'width'}},
                          **legacy)


def check(module: nn.Module, path: Path, shapes: List[Tuple[int, int]]) -> float:
    """The largest |onnxruntime - PyTorch| over all outputs at each shape, printed per shape."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    worst = 0.0
    for shape in shapes:
        image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = module(image)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {'image': image.numpy()})
        diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
        worst = max(worst, diff)
        print(f'  {path.name} at {shape[0]}x{shape[1]}: max abs difference {diff:.2e}', flush=True)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='an mmdet or mmseg config with a DAT backbone')
    parser.add_argument('--checkpoint', help='weights of the whole detector / segmentor (default: random)')
    parser.add_argument('--shape', nargs=2, type=int, required=True, metavar=('H', 'W'), help='export input size')
    parser.add_argument('--out', help='backbone .onnx file (default: work_dirs/onnx/<config name>.onnx)')
    parser.add_argument('--check', action='store_true', help='compare onnxruntime with PyTorch')
    args = parser.parse_args()
    if importlib.util.find_spec('onnx') is None:
        raise SystemExit('ONNX export needs onnx (and onnxruntime for --check): pip install onnx onnxruntime')
    if not Path(args.config).is_file():
        raise SystemExit(f'Config file not found: {args.config}')
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise SystemExit(f'Checkpoint not found: {args.checkpoint}')
    height, width = args.shape
    if min(height, width) < 32:
        raise SystemExit(f'--shape {height} {width}: both sides need at least 32 pixels')

    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if cfg.model.get('backbone', {}).get('type') not in ('dat_mm.DAT', 'DAT'):
        raise SystemExit(f"{args.config}: the backbone is {cfg.model.get('backbone', {}).get('type')!r}, not DAT")
    torch.manual_seed(0)   # reproducible random weights when no checkpoint is given
    model = build_model(cfg)
    if args.checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, args.checkpoint, map_location='cpu', strict=True)
    else:
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)   # init_weights logs every parameter
        model.init_weights()
        logger.setLevel(level)
        print('No --checkpoint: exporting randomly initialised weights', flush=True)

    out = Path(args.out or Path('work_dirs', 'onnx', Path(args.config).stem + '.onnx'))
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    # (module to export, the PyTorch module it must agree with, file, output names)
    exports = [(backbone, backbone, out, [f'stage{i}' for i in backbone.out_indices])]
    if cfg.default_scope == 'mmseg':
        exported = copy.deepcopy(model)
        replace_adaptive_pooling(exported)
        exports.append((SegmentorTensorMode(exported).eval(), SegmentorTensorMode(model).eval(),
                        out.with_name(f'{out.stem}_segmentor.onnx'), ['logits']))
    worst = 0.0
    for module, reference, path, outputs in exports:
        export(module, (height, width), path, outputs)
        print(f'wrote {path} (opset {OPSET}, dynamic height and width, {path.stat().st_size / 1e6:.1f} MB)',
              flush=True)
        if args.check:
            worst = max(worst, check(reference, path, check_shapes(height, width)))
    if args.check:
        print(f"{'PASS' if worst <= TOLERANCE else 'FAIL'}: max abs difference {worst:.2e} "
              f'(tolerance {TOLERANCE:.0e})')
        return 0 if worst <= TOLERANCE else 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
