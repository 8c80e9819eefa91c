"""tools/train.py says, in one line at launch, when the configured LR was set for another total batch than the
launch trains with and --auto-scale-lr is off: the silent way to train at the wrong LR on fewer GPUs."""
import importlib.util
import subprocess
import sys

import pytest
from mmengine.config import ConfigDict

from commands import ROOT, tool_env

_spec = importlib.util.spec_from_file_location('dat_mm_train_tool', ROOT / 'tools' / 'train.py')
train_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tool)


def _cfg(per_gpu: int, base=64, enable=False) -> ConfigDict:
    cfg = ConfigDict(train_dataloader=dict(batch_size=per_gpu))
    if base is not None:
        cfg.auto_scale_lr = dict(enable=enable, base_batch_size=base)
    return cfg


def test_the_warning_gives_both_batches_and_names_the_flag():
    line = train_tool.lr_batch_warning(_cfg(2), world_size=8, auto_scale_lr=False)
    assert '\n' not in line
    assert 'total batch of 64' in line and '8 x 2 = 16' in line and '--auto-scale-lr' in line


@pytest.mark.parametrize('cfg, world_size, flag', [
    (_cfg(2), 32, False),                     # the recipe's own launch: 32 GPUs x 2
    (_cfg(2), 8, True),                       # --auto-scale-lr
    (_cfg(2, enable=True), 8, False),         # the config scales itself
    (_cfg(4, base=None), 1, False),           # no base batch to compare with (the segmentation configs)
])
def test_no_warning_where_the_lr_fits_or_is_scaled(cfg, world_size, flag):
    assert train_tool.lr_batch_warning(cfg, world_size, flag) is None


@pytest.mark.parametrize('launcher, env, expected', [
    ('none', {'WORLD_SIZE': '8'}, (1, 0)),
    ('pytorch', {'WORLD_SIZE': '8', 'RANK': '3'}, (8, 3)),
    ('slurm', {'SLURM_NTASKS': '32', 'SLURM_PROCID': '0'}, (32, 0)),
    ('mpi', {'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '1'}, (4, 1)),
])
def test_the_launch_size_comes_from_the_launchers_environment(launcher, env, expected):
    assert train_tool.launch_size(launcher, env) == expected


def test_train_prints_the_warning_once_at_launch(tmp_path):
    """A DAT++ detection config (base batch 64, 2 images per GPU) in one process: total batch 2. The run stops
    right after the launch checks, on a checkpoint that does not exist, so that no model is built."""
    config = ROOT / 'configs/det/retinanet_dat-t++_fpn_ms-crop-1x_coco.py'
    proc = subprocess.run([sys.executable, ROOT / 'tools/train.py', config, '--work-dir', tmp_path,
                           '--resume', tmp_path / 'nope.pth'], cwd=tmp_path, env=tool_env(),
                          capture_output=True, text=True)
    assert 'checkpoint not found' in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if 'auto_scale_lr.base_batch_size' in line]
    assert len(lines) == 1, proc.stdout[-2000:]
    assert 'total batch of 64' in lines[0] and '1 x 2 = 2' in lines[0] and '--auto-scale-lr' in lines[0]
    proc = subprocess.run([sys.executable, ROOT / 'tools/train.py', config, '--work-dir', tmp_path,
                           '--auto-scale-lr', '--resume', tmp_path / 'nope.pth'], cwd=tmp_path, env=tool_env(),
                          capture_output=True, text=True)
    assert 'checkpoint not found' in proc.stderr and 'base_batch_size' not in proc.stdout, proc.stdout[-2000:]
