"""Evaluates a checkpoint of an mmdet or mmseg config on its test set; prints the metrics once, from rank 0.

    python tools/test.py CONFIG CHECKPOINT [--tta] [--out PATH] [--show] [--show-dir DIR] [--wait-time S]
                         [--work-dir DIR] [--cfg-options ...] [--launcher {none,pytorch,slurm,mpi}]

--out and --show-dir mean what they mean to each library's own tools/test.py:
    --out      mmdet: a .pkl (or .pickle) file of the predictions (mmdet's DumpDetResults, masks RLE-encoded);
               mmseg: a folder of prediction maps, one PNG of class indices per image (the evaluator's output_dir).
    --show-dir mmdet: drawings go to WORK_DIR/<timestamp>/DIR (DIR itself where it is absolute);
               mmseg: to DIR/vis_data/vis_image, through the config's visualizer.
"""
import argparse
import sys
from pathlib import Path

from mmengine.dist import is_main_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm.runner import (add_common_args, build_runner, config_scope, load_config,  # noqa: E402
                           skip_backbone_init)

PICKLE = ('.pkl', '.pickle')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file (a training checkpoint, or converted weights)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline (ADE20K: ratios 0.5-1.75 + flip)")
    parser.add_argument('--out', metavar='PATH',
                        help='keep the predictions: mmdet, a .pkl file; mmseg, a folder of prediction maps')
    parser.add_argument('--show', action='store_true', help='show each drawn prediction in a window')
    parser.add_argument('--show-dir', metavar='DIR',
                        help='write each drawn prediction (mmdet: under WORK_DIR/<timestamp>/DIR; '
                             'mmseg: under DIR/vis_data/vis_image)')
    parser.add_argument('--wait-time', type=float, default=2, metavar='S',
                        help='seconds each shown image stays up (with --show; default 2)')
    return parser.parse_args()


def draw_predictions(cfg, args: argparse.Namespace, scope: str) -> None:
    """Turns the config's visualisation hook on for --show / --show-dir, as each library's test.py does."""
    if 'visualization' not in cfg.get('default_hooks', {}):
        raise SystemExit(f'--show / --show-dir draw through default_hooks.visualization, which {args.config} '
                         'does not define')
    if scope == 'mmdet':
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        trigger_visualization_hook(cfg, args)
        return
    hook = cfg.default_hooks.visualization
    # interval=1: mmseg's hook would draw only every 50th test image otherwise.
    hook.update(draw=True, interval=1)
    if args.show:
        hook.update(show=True, wait_time=args.wait_time)
    if args.show_dir:
        cfg.visualizer.save_dir = args.show_dir


def keep_seg_maps(cfg, out: str) -> None:
    """Has mmseg's evaluator write each prediction map into ``out``, as mmseg's test.py does (keep_results: a
    CityscapesMetric deletes its output folder after evaluating otherwise)."""
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
    for evaluator in evaluators:
        evaluator.update(output_dir=out, keep_results=True)
    # mmseg's IoUMetric makes the folder on rank 0 alone, and another rank may write its first map before that.
    Path(out).mkdir(parents=True, exist_ok=True)


def main() -> None:
    args = parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f'Checkpoint not found: {args.checkpoint}')
    cfg = load_config(args)
    scope = config_scope(cfg)
    if args.out and (scope == 'mmdet') != args.out.endswith(PICKLE):
        raise SystemExit(f'--out {args.out}: ' + ('an mmdet config writes a .pkl or .pickle file' if scope == 'mmdet'
                                                  else 'an mmseg config writes a folder of PNGs, not a pickle'))
    cfg.load_from = args.checkpoint
    skip_backbone_init(cfg)
    if args.tta:
        if 'tta_pipeline' not in cfg or 'tta_model' not in cfg:
            raise SystemExit(f'{args.config} defines no tta_pipeline / tta_model')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.show or args.show_dir:
        draw_predictions(cfg, args, scope)
    if args.out and scope == 'mmseg':
        keep_seg_maps(cfg, args.out)

    runner = build_runner(cfg)
    if args.out and scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    if is_main_process():   # every rank gets the metrics; under torchrun or Slurm all would print them
        print({k: round(float(v), 4) for k, v in metrics.items()})


if __name__ == '__main__':
    main()
