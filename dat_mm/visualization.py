"""Where deformable attention looks: sampling points in image pixels, drawn over the image."""
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch

# One colour per offset group (BGR), cycling for more groups.
GROUP_COLOURS = [(0, 0, 255), (0, 200, 0), (255, 80, 0), (0, 200, 255), (255, 0, 255), (255, 255, 0)]


def points_to_pixels(points: torch.Tensor, feature_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> torch.Tensor:
    """(..., 2) sampling points, (y, x) in [-1, 1] over a feature map -> (..., 2) (x, y) image pixels.

    The attention samples with ``align_corners=True``: -1 and 1 are the centres of the first and last feature
    pixels, and feature pixel j covers image pixels [j * s, (j + 1) * s) for a stride s.
    """
    out = []
    for axis in (1, 0):   # x then y
        n, size = feature_hw[axis], image_hw[axis]
        feature = (points[..., axis] + 1) / 2 * (n - 1)
        out.append((feature + 0.5) * (size / n) - 0.5)
    return torch.stack(out, dim=-1)


def draw_sampling_points(image: np.ndarray, pixels: Sequence[np.ndarray], radius: int = 1) -> np.ndarray:
    """Draws each group's (N, 2) (x, y) pixel points in its own colour on a copy of a BGR image."""
    canvas = image.copy()
    for group, pts in enumerate(pixels):
        colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
        for x, y in np.round(pts).astype(int):
            cv2.circle(canvas, (int(x), int(y)), radius, colour, thickness=-1)
    return canvas


def forward_with_points(model, x: torch.Tensor) -> Tuple[List[Tuple[int, int]], list]:
    """Runs a DAT backbone; returns each stage's feature size (H, W) and its sampling points."""
    shapes = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(tuple(o[0].shape[2:]))) for s in model.stages]
    try:
        with torch.no_grad():
            _, points = model(x, return_points=True)
    finally:
        for h in hooks:
            h.remove()
    return shapes, points


def deformable_blocks(points: Sequence[Sequence]) -> List[Tuple[int, int]]:
    """(stage, block) of every deformable block, in order, from the points a DAT forward returns."""
    return [(s, b) for s, stage in enumerate(points) for b, p in enumerate(stage) if p is not None]


def block_pixels(points: Sequence[Sequence], feature_shapes: Sequence[Tuple[int, int]], image_hw: Tuple[int, int],
                 stage: int, block: int) -> List[np.ndarray]:
    """Per group, the (Hk*Wk, 2) image-pixel sampling points of one deformable block of image 0."""
    entry = points[stage][block]
    if entry is None:
        raise ValueError(f'block {stage}.{block} is not a deformable block')
    pixels = points_to_pixels(entry[0][0].float(), feature_shapes[stage], image_hw)   # (groups, Hk, Wk, 2)
    return [g.reshape(-1, 2).numpy() for g in pixels]
