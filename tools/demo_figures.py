"""Pictures of a trained demo model on its val images, drawn by mmdet's / mmseg's own visualizers.

    python tools/demo_figures.py det CONFIG CHECKPOINT OUT.png   # predictions + deformable sampling points
    python tools/demo_figures.py seg CONFIG CHECKPOINT OUT.png   # ground truth beside prediction

Detector: each panel shows the predicted boxes, masks and scores over the image, and where the last
deformable block of the backbone sampled its keys for that image (dots, one colour per offset group). For a
legible picture it draws detections from --score-thr and, of boxes that overlap (any class), the highest-scoring
one only (--overlap). That filters the picture alone: the detector's own test settings, and so its metrics,
stay as configured.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm.visualization import (block_pixels, deformable_blocks, draw_sampling_points,  # noqa: E402
                                  forward_with_points)

ZOOM = 3   # the tiny images are 128 px: drawn larger so that labels and dots stay readable


def one_box_per_object(bboxes: torch.Tensor, scores: torch.Tensor, overlap: float) -> torch.Tensor:
    """Indices of the boxes to draw, best score first: a box is left out when it covers more than ``overlap`` of
    the smaller box's area in common with a higher-scoring box already kept, whatever the two classes. Unlike
    the IoU of the detector's own NMS, the smaller box's area also catches a part box inside a whole one."""
    kept = []
    areas = (bboxes[:, 2] - bboxes[:, 0]).clamp(min=0) * (bboxes[:, 3] - bboxes[:, 1]).clamp(min=0)
    for i in scores.argsort(descending=True).tolist():
        for j in kept:
            width = (torch.min(bboxes[i, 2], bboxes[j, 2]) - torch.max(bboxes[i, 0], bboxes[j, 0])).clamp(min=0)
            height = (torch.min(bboxes[i, 3], bboxes[j, 3]) - torch.max(bboxes[i, 1], bboxes[j, 1])).clamp(min=0)
            if width * height > overlap * torch.min(areas[i], areas[j]).clamp(min=1e-6):
                break
        else:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def val_images(cfg, count: int) -> list:
    dataset = cfg.test_dataloader.dataset
    prefix = dataset.data_prefix.get('img', dataset.data_prefix.get('img_path'))
    folder = Path(dataset.data_root) / prefix
    return sorted(p for p in folder.iterdir() if p.suffix in ('.png', '.jpg'))[:count]


def detector_panel(model, visualizer, path: Path, score_thr: float, overlap: float) -> np.ndarray:
    from mmdet.apis import inference_detector
    inputs = []
    hook = model.backbone.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    try:
        result = inference_detector(model, str(path))
    finally:
        hook.remove()
    shapes, points = forward_with_points(model.backbone, inputs[0])
    stage, block = deformable_blocks(points)[-1]
    pixels = block_pixels(points, shapes, tuple(inputs[0].shape[2:]), stage, block)
    scale_w, scale_h = result.metainfo['scale_factor']

    image = cv2.imread(str(path))
    big = cv2.resize(image, None, fx=ZOOM, fy=ZOOM, interpolation=cv2.INTER_NEAREST)
    inst = result.pred_instances[result.pred_instances.scores >= score_thr]
    if overlap < 1:
        inst = inst[one_box_per_object(inst.bboxes, inst.scores, overlap)]
    inst.bboxes = inst.bboxes * ZOOM
    if 'masks' in inst:   # nearest-neighbour upscaling, which also keeps an empty (0, H, W) stack valid
        inst.masks = inst.masks.repeat_interleave(ZOOM, 1).repeat_interleave(ZOOM, 2)
    result.pred_instances = inst
    visualizer.add_datasample(path.name, big[..., ::-1], result, draw_gt=False, show=False, pred_score_thr=score_thr)
    drawn = np.ascontiguousarray(visualizer.get_image()[..., ::-1])
    dots = [(p / np.array([scale_w, scale_h]) + 0.5) * ZOOM - 0.5 for p in pixels]
    drawn = draw_sampling_points(drawn, dots, radius=2)
    cv2.putText(drawn, f'{path.name}: {len(inst)} objects, keys of block {stage}.{block}', (4, 14),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return drawn


def segmentor_panel(model, visualizer, cfg, path: Path) -> np.ndarray:
    from mmengine.structures import PixelData
    from mmseg.apis import inference_model
    result = inference_model(model, str(path))
    dataset = cfg.test_dataloader.dataset
    label_path = Path(dataset.data_root) / dataset.data_prefix.seg_map_path / (path.stem + dataset.seg_map_suffix)
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    if dataset.get('reduce_zero_label'):
        label = np.where(label == 0, 255, label - 1).astype(np.uint8)
    grow = dict(fx=ZOOM, fy=ZOOM, interpolation=cv2.INTER_NEAREST)
    pred = result.pred_sem_seg.data[0].numpy().astype(np.uint8)
    for field, labels in (('gt_sem_seg', label), ('pred_sem_seg', pred)):
        big = cv2.resize(labels, None, **grow).astype(np.int64)
        result.set_data({field: PixelData(data=torch.from_numpy(big)[None])})
    image = cv2.imread(str(path))
    sides = []
    for gt in (True, False):   # one at a time: get_image() holds the last drawing, not mmseg's pair
        visualizer.add_datasample(path.name, cv2.resize(image, None, **grow)[..., ::-1], result, draw_gt=gt,
                                  draw_pred=not gt, show=False, with_labels=True)
        sides.append(visualizer.get_image()[..., ::-1])
    drawn = np.ascontiguousarray(np.concatenate(sides, axis=1))
    half = drawn.shape[1] // 2
    for x, text in ((4, 'ground truth'), (half + 4, 'prediction')):
        cv2.putText(drawn, f'{path.name}: {text}', (x, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return drawn


def grid(panels: list, columns: int) -> np.ndarray:
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // columns)
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = panel
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('task', choices=['det', 'seg'])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out', help='PNG to write')
    parser.add_argument('--images', type=int, default=4, help='val images to draw')
    parser.add_argument('--score-thr', type=float, default=0.8, help='detections drawn from this score')
    parser.add_argument('--overlap', type=float, default=0.3,
                        help='of two drawn boxes (any classes) sharing more than this fraction of the smaller '
                             "one's area, only the higher-scoring one is drawn; 1 draws all")
    args = parser.parse_args()

    if args.task == 'det':
        from mmdet.apis import init_detector
        from mmdet.visualization import DetLocalVisualizer
        model = init_detector(args.config, args.checkpoint, device='cpu', cfg_options={'model.backbone.init_cfg': None})
        visualizer = DetLocalVisualizer(name='demo_figures', line_width=2, alpha=0.5)
        visualizer.dataset_meta = model.dataset_meta
        panels = [detector_panel(model, visualizer, p, args.score_thr, args.overlap)
                  for p in val_images(model.cfg, args.images)]
        columns = 2
    else:
        from mmseg.apis import init_model
        from mmseg.visualization import SegLocalVisualizer
        model = init_model(args.config, args.checkpoint, device='cpu', cfg_options={'model.backbone.init_cfg': None})
        visualizer = SegLocalVisualizer(name='demo_figures', alpha=0.6)
        visualizer.dataset_meta = model.dataset_meta
        panels = [segmentor_panel(model, visualizer, model.cfg, p) for p in val_images(model.cfg, args.images)]
        columns = 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, grid(panels, columns))
    print(args.out)


if __name__ == '__main__':
    main()
