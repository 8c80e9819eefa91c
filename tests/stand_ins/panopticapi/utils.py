"""COCO panoptic PNGs encode a segment id per pixel as id = R + 256 G + 256^2 B."""
import numpy as np


def rgb2id(color):
    if isinstance(color, np.ndarray) and color.ndim == 3:
        color = color.astype(np.int64)
        return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]
    return int(color[0]) + 256 * int(color[1]) + 256 * 256 * int(color[2])


def id2rgb(id_map):
    if isinstance(id_map, np.ndarray):
        ids = id_map.astype(np.int64)
        return np.stack([(ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)
    return [(int(id_map) >> shift) & 255 for shift in (0, 8, 16)]
