"""Draws where DAT's deformable blocks sample their keys, over an input image (one PNG per block).

    python tools/visualize_sampling.py demo.jpg --arch tiny++ --checkpoint checkpoints/dat_pp_tiny_in1k_224.pth
    python tools/visualize_sampling.py demo.jpg --config configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py \
        --checkpoint work_dirs/.../iter_300.pth --blocks 2.1 3.0
Without --checkpoint the weights are random. Points are coloured by offset group.
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm import DAT  # noqa: E402
from dat_mm.checkpoint import load_backbone_checkpoint  # noqa: E402
from dat_mm.visualization import (block_pixels, deformable_blocks, draw_sampling_points,  # noqa: E402
                                  forward_with_points)

MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])


def build_backbone(args) -> DAT:
    if args.config:
        from mmengine.config import Config
        cfg = Config.fromfile(args.config)
        kwargs = {k: v for k, v in cfg.model.backbone.items() if k not in ('type', 'init_cfg', '_delete_')}
        model = DAT(**kwargs)
    else:
        model = DAT(arch=json.loads(args.arch) if args.arch.strip().startswith('{') else args.arch)
    if args.checkpoint:
        load_backbone_checkpoint(model, args.checkpoint)
    else:
        model.init_weights()
    return model.eval()


def visualize(model: DAT, image_bgr: np.ndarray, blocks, out_dir: Path, radius: int = 1) -> list:
    """Writes one PNG per (stage, block) and returns their paths; ``blocks`` None means every 'D' block."""
    rgb = image_bgr[..., ::-1].astype(np.float64)
    x = torch.from_numpy(((rgb - MEAN) / STD).transpose(2, 0, 1)).float()[None]
    feature_shapes, points = forward_with_points(model, x)
    if blocks is None:
        blocks = deformable_blocks(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, block in blocks:
        pixels = block_pixels(points, feature_shapes, image_bgr.shape[:2], stage, block)
        path = out_dir / f'sampling_stage{stage}_block{block}.png'
        cv2.imwrite(str(path), draw_sampling_points(image_bgr, pixels, radius))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='input image')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--arch', default='tiny++', help='preset name or JSON arch dict (default tiny++)')
    source.add_argument('--config', help="take the backbone from this mmdet / mmseg config")
    parser.add_argument('--checkpoint', help='backbone or whole-model checkpoint (default: random weights)')
    parser.add_argument('--blocks', nargs='*', help='STAGE.BLOCK, e.g. 2.1 (default: every deformable block)')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help='resize the image first')
    parser.add_argument('--radius', type=int, default=1, help='dot radius in pixels')
    parser.add_argument('--out-dir', default='work_dirs/sampling', help='where the PNGs go')
    args = parser.parse_args()

    image = cv2.imread(args.image)
    if image is None:
        raise SystemExit(f'Cannot read image {args.image}')
    if args.size:
        image = cv2.resize(image, (args.size[1], args.size[0]))
    blocks = [tuple(int(v) for v in b.split('.')) for b in args.blocks] if args.blocks else None
    for path in visualize(build_backbone(args), image, blocks, Path(args.out_dir), args.radius):
        print(path)


if __name__ == '__main__':
    main()
