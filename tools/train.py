"""Trains an mmdet or mmseg config with a DAT backbone (single process, or one rank under torchrun).

    python tools/train.py configs/det/mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py \
        --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/dat_pp_tiny_in1k_224.pth
    python tools/train.py CONFIG --resume            # continue from work_dir's newest checkpoint that loads
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm.runner import add_common_args, build_runner, load_config, resumable_checkpoint  # noqa: E402


# Where each launcher puts the job's process count and this process's rank (torchrun, Slurm's srun, Open MPI).
WORLD_VARIABLES = {'pytorch': ('WORLD_SIZE', 'RANK'), 'slurm': ('SLURM_NTASKS', 'SLURM_PROCID'),
                   'mpi': ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK')}


def launch_size(launcher: str, env: Mapping[str, str]) -> tuple:
    """(processes in the job, this process's rank), as the launcher announces them; (1, 0) without one."""
    if launcher not in WORLD_VARIABLES:
        return 1, 0
    size, rank = WORLD_VARIABLES[launcher]
    return int(env.get(size, 1)), int(env.get(rank, 0))


def lr_batch_warning(cfg, world_size: int, auto_scale_lr: bool) -> Optional[str]:
    """The one line that says the configured LR was set for another total batch than this launch's, or None.

    None where LR scaling is on (``--auto-scale-lr`` or the config's ``auto_scale_lr.enable``), where the config
    names no ``auto_scale_lr.base_batch_size``, and where the launch's total batch equals it."""
    scaling = cfg.get('auto_scale_lr') or {}
    base = scaling.get('base_batch_size')
    if auto_scale_lr or scaling.get('enable') or base is None:
        return None
    per_gpu = cfg.train_dataloader.batch_size
    total = world_size * per_gpu
    if total == base:
        return None
    return (f'warning: the config\'s LR is set for a total batch of {base} (auto_scale_lr.base_batch_size), but '
            f'this launch trains {world_size} x {per_gpu} = {total} images per step; the LR stays as configured '
            f'unless you pass --auto-scale-lr, which scales it by {total}/{base}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help="resume (weights, optimizer, scheduler, iteration) from CHECKPOINT, or with no "
                             "value from the work dir's newest checkpoint that loads")
    parser.add_argument('--amp', action='store_true', help='mixed precision (AmpOptimWrapper)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help="scale the LR by (GPUs x images per GPU) / the config's auto_scale_lr.base_batch_size")
    args = parser.parse_args()
    cfg = load_config(args)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    world_size, rank = launch_size(args.launcher, os.environ)
    warning = lr_batch_warning(cfg, world_size, args.auto_scale_lr)
    if warning and rank == 0:
        print(warning, flush=True)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise SystemExit('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        checkpoint = resumable_checkpoint(cfg.work_dir)
        if checkpoint is None:
            print(f'--resume: no checkpoint in {cfg.work_dir} yet, starting from scratch', flush=True)
        cfg.resume, cfg.load_from = True, checkpoint
    elif args.resume:
        if not Path(args.resume).is_file():
            raise SystemExit(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume

    build_runner(cfg).train()


if __name__ == '__main__':
    main()
