"""Evaluates a checkpoint of an mmdet or mmseg config on its test set.

    python tools/test.py CONFIG CHECKPOINT [--tta] [--work-dir DIR] [--cfg-options ...]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm.runner import add_common_args, build_runner, load_config, skip_backbone_init  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file (a training checkpoint, or converted weights)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline (ADE20K: ratios 0.5-1.75 + flip)")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f'Checkpoint not found: {args.checkpoint}')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    skip_backbone_init(cfg)
    if args.tta:
        if 'tta_pipeline' not in cfg or 'tta_model' not in cfg:
            raise SystemExit(f'{args.config} defines no tta_pipeline / tta_model')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    metrics = build_runner(cfg).test()
    print({k: round(float(v), 4) for k, v in metrics.items()})


if __name__ == '__main__':
    main()
