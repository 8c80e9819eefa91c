"""What tools/train.py and tools/test.py share: one config loader for mmdet and mmseg configs."""
import argparse
import os.path as osp
from typing import Optional

from mmengine.config import Config, DictAction


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('config', help='an mmdet or mmseg config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help="override config entries, e.g. model.backbone.init_cfg.checkpoint=dat.pth")
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (tools/dist_*.sh use pytorch, i.e. torchrun)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace) -> Config:
    """The config with command-line overrides, launcher and work dir applied; the library registered."""
    if not osp.isfile(args.config):
        raise SystemExit(f'Config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise SystemExit(f"{args.config}: default_scope is {scope!r}; expected an mmdet or mmseg config")
    # Registers every mmdet / mmseg module so that Runner.from_cfg finds datasets, metrics and hooks.
    __import__(f'{scope}.utils', fromlist=['register_all_modules']).register_all_modules(init_default_scope=False)
    import dat_mm  # noqa: F401  (backbone registry and safe checkpoint loading, whatever the config imports)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint MMEngine recorded as the latest in ``work_dir``, if any."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        return None
    with open(marker) as f:
        path = f.read().strip()
    return path if osp.isfile(path) else None
