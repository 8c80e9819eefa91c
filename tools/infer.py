"""Predicts on images with an mmdet or mmseg config and writes the drawn predictions.

    python tools/infer.py demo.jpg configs/det/mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py model.pth
    python tools/infer.py images/ configs/seg/upernet_dat-t++_8xb2-160k_ade20k-512x512.py model.pth --out-dir out

A thin wrapper over mmdet's DetInferencer and mmseg's MMSegInferencer, picked by the config's scope. The
pictures go to OUT_DIR/vis/. Without a checkpoint the weights are random (for trying a config out).
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_inferencer(config: str, checkpoint: str = None, device: str = 'cpu', score_thr: float = 0.3):
    """A callable ``(inputs, out_dir)`` over the inferencer of the config's scope."""
    from mmengine.config import Config
    import dat_mm  # noqa: F401  (registers the backbone; safe checkpoint loading)
    from dat_mm.runner import config_scope, skip_backbone_init
    cfg = Config.fromfile(config)
    skip_backbone_init(cfg)
    if config_scope(cfg) == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device, show_progress=False)
        return functools.partial(inferencer, pred_score_thr=score_thr)
    from mmseg.apis import MMSegInferencer
    return MMSegInferencer(model=cfg, weights=checkpoint, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', help='an image or a folder of images')
    parser.add_argument('config', help='an mmdet or mmseg config file')
    parser.add_argument('checkpoint', nargs='?', help='trained weights (default: random)')
    parser.add_argument('--out-dir', default='work_dirs/infer', help='pictures go to OUT_DIR/vis/')
    parser.add_argument('--device', default='cpu', help="e.g. 'cuda:0'")
    parser.add_argument('--score-thr', type=float, default=0.3, help='detectors: draw boxes from this score')
    args = parser.parse_args()
    for path, what in ((args.inputs, 'Input'), (args.config, 'Config'), (args.checkpoint, 'Checkpoint')):
        if path and not Path(path).exists():
            raise SystemExit(f'{what} not found: {path}')
    infer = build_inferencer(args.config, args.checkpoint, args.device, args.score_thr)
    infer(args.inputs, out_dir=args.out_dir)
    for picture in sorted((Path(args.out_dir) / 'vis').iterdir()):
        print(picture)


if __name__ == '__main__':
    main()
