"""Writes a small synthetic dataset in COCO instance, COCO panoptic and ADE20K semantic formats.

Scenes of squares, circles and triangles (each class with its own hue, jittered) on a noisy background:
learnable in minutes on a CPU, with real boxes, polygon masks and label maps. Deterministic for a seed.
The panoptic annotations hold the same objects as the instance ones (things) and the background as one
stuff segment; pixels of an object too small for a polygon are void.

    python tools/make_tiny_dataset.py data/tiny            # -> data/tiny/coco, data/tiny/ade
"""
import argparse
import json
from pathlib import Path

import cv2
import numpy as np

CLASSES = ('square', 'circle', 'triangle')
HUES = {'square': (200, 60, 50), 'circle': (50, 180, 60), 'triangle': (60, 80, 210)}   # RGB
# Radius factors that give every shape the area of a circle of the drawn radius. Inscribed in the same circle,
# a triangle covers 41 % of it, and at a third of a square's area the segmentor never learned to label it.
AREA_SCALE = {'square': (np.pi / 4) ** 0.5, 'circle': 1.0, 'triangle': (np.pi / (3 * 3 ** 0.5 / 4)) ** 0.5}
# ADE20K convention: 0 is 'other' and is ignored (reduce_zero_label), so labels start at 1.
ADE_CLASSES = ('background',) + CLASSES
# COCO panoptic: the shapes are things, the background is stuff (category id 4); segment id 0 is void.
STUFF_CLASSES = ('background',)
BACKGROUND_SEGMENT = 255   # segment ids of things count from 1; an image holds at most 5 objects


def _panoptic_png(segments: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) -> the BGR image cv2 writes for COCO panoptic's RGB encoding, id = R + 256 G + 256^2 B."""
    rgb = [(segments >> shift) & 255 for shift in (0, 8, 16)]
    return np.stack(rgb[::-1], axis=-1).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    if kind == 'square':
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == 'circle':
        pts = [(np.cos(a), np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)]
    else:
        turn = rng.uniform(0, 2 * np.pi)
        pts = [(np.cos(turn + a), np.sin(turn + a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
    return np.array([(cx + r * x, cy + r * y) for x, y in pts], dtype=np.float32)


def make_scene(rng: np.random.Generator, size: int):
    """An RGB image, its objects [(class index, polygon)] and its ADE label map."""
    image = (rng.normal(110, 25, (size, size, 3)) + rng.uniform(-30, 30, 3)).clip(0, 255)
    labels = np.ones((size, size), np.uint8)   # 1 = background
    objects = []
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(len(CLASSES)))
        r = rng.uniform(size * 0.08, size * 0.2) * AREA_SCALE[CLASSES[cls]]
        cx, cy = rng.uniform(r, size - r, 2)
        poly = _polygon(CLASSES[cls], cx, cy, r, rng)
        color = np.array(HUES[CLASSES[cls]]) + rng.normal(0, 15, 3)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [poly.round().astype(np.int32)], 1)
        if mask.sum() < 20:
            continue
        image[mask == 1] = color + rng.normal(0, 8, (int(mask.sum()), 3))
        # Later shapes occlude earlier ones: keep the label map and earlier masks consistent.
        labels[mask == 1] = cls + 2
        objects = [(c, p, m & (1 - mask)) for c, p, m in objects]
        objects.append((cls, poly, mask))
    return image.clip(0, 255).astype(np.uint8), objects, labels


def write_dataset(root: Path, seed: int = 0, train: int = 48, val: int = 16, size: int = 128) -> None:
    rng = np.random.default_rng(seed)
    coco_root, ade_root = root / 'coco', root / 'ade'
    for split, count in (('train', train), ('val', val)):
        ade_split = 'training' if split == 'train' else 'validation'
        for d in (coco_root / split, coco_root / f'panoptic_{split}', ade_root / 'images' / ade_split,
                  ade_root / 'annotations' / ade_split):
            d.mkdir(parents=True, exist_ok=True)
        images, annotations, panoptic = [], [], []
        for i in range(count):
            image, objects, labels = make_scene(rng, size)
            name = f'{split}_{i:04d}'
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(coco_root / split / f'{name}.png'), bgr)
            cv2.imwrite(str(ade_root / 'images' / ade_split / f'{name}.jpg'), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(ade_root / 'annotations' / ade_split / f'{name}.png'), labels)
            images.append(dict(id=i, file_name=f'{name}.png', height=size, width=size))
            segments = np.zeros((size, size), np.int64)
            segments[labels == 1] = BACKGROUND_SEGMENT
            segments_info = []
            for cls, _, mask in objects:
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
                if not polygons:
                    continue
                ys, xs = np.nonzero(mask)
                x0, y0 = float(xs.min()), float(ys.min())
                bbox = [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i, category_id=cls + 1, iscrowd=0, area=float(mask.sum()),
                    bbox=bbox, segmentation=polygons))
                segments[mask == 1] = len(segments_info) + 1
                segments_info.append(dict(id=len(segments_info) + 1, category_id=cls + 1, iscrowd=0,
                                          area=int(mask.sum()), bbox=bbox))
            ys, xs = np.nonzero(segments == BACKGROUND_SEGMENT)
            if len(ys):
                x0, y0 = float(xs.min()), float(ys.min())
                segments_info.append(dict(
                    id=BACKGROUND_SEGMENT, category_id=len(CLASSES) + 1, iscrowd=0, area=len(ys),
                    bbox=[x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]))
            cv2.imwrite(str(coco_root / f'panoptic_{split}' / f'{name}.png'), _panoptic_png(segments))
            panoptic.append(dict(image_id=i, file_name=f'{name}.png', segments_info=segments_info))
        categories = [dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)]
        (coco_root / f'{split}.json').write_text(
            json.dumps(dict(images=images, annotations=annotations, categories=categories)))
        panoptic_categories = [dict(id=i + 1, name=n, supercategory='shape', isthing=1) for i, n in enumerate(CLASSES)]
        panoptic_categories += [dict(id=len(CLASSES) + i + 1, name=n, supercategory='stuff', isthing=0)
                                for i, n in enumerate(STUFF_CLASSES)]
        (coco_root / f'panoptic_{split}.json').write_text(
            json.dumps(dict(images=images, annotations=panoptic, categories=panoptic_categories)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default='data/tiny')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train', type=int, default=48, help='training images')
    parser.add_argument('--val', type=int, default=16, help='validation images')
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    args = parser.parse_args()
    write_dataset(Path(args.root), args.seed, args.train, args.val, args.size)
    print(f'Wrote {args.train} + {args.val} images to {args.root}/coco (COCO instances; panoptic_*.json and '
          f'panoptic_*/ for COCO panoptic) and {args.root}/ade (ADE20K)')


if __name__ == '__main__':
    main()
