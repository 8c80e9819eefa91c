"""The OpenMMLab stack the project stands on: compiled mmcv ops, mmdet, mmseg, and checkpoint resume."""
import pickle

import pytest
import torch
from torch import nn

import dat_mm  # noqa: F401  (registers the safe globals under test)


@pytest.mark.compat
def test_mmcv_nms_suppresses_the_overlapping_box():
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)   # IoU of the first two is 81 / 119 = 0.68
    assert keep.tolist() == [0, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.9, 0.7]))


@pytest.mark.compat
def test_mmcv_roi_align_averages_bilinear_samples():
    from mmcv.ops import RoIAlign
    feature = torch.arange(8.).repeat(1, 1, 8, 1)          # f(y, x) = x
    roi = torch.tensor([[0., 0., 0., 4., 4.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feature, roi)
    # aligned=True shifts by half a pixel: bin samples at x = 0, 1 and 2, 3.
    assert torch.allclose(out, torch.tensor([[[[0.5, 2.5], [0.5, 2.5]]]]))


@pytest.mark.compat
def test_mmdet_and_mmseg_compute_known_values():
    from mmdet.structures.bbox import bbox_overlaps
    from mmseg.evaluation.metrics import IoUMetric
    iou = bbox_overlaps(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([[5., 0., 15., 10.]]))
    assert torch.allclose(iou, torch.tensor([[50. / 150.]]))
    pred = torch.tensor([[0, 1], [1, 1]])
    label = torch.tensor([[0, 0], [1, 1]])
    inter, union, _, _ = IoUMetric.intersect_and_union(pred, label, num_classes=2, ignore_index=255)
    assert inter.tolist() == [1, 2] and union.tolist() == [2, 3]


class _Toy(nn.Module):
    pass


def _toy_runner(work_dir, max_iters, resume):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class ToyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, targets=None, mode='tensor'):
            out = self.linear(inputs)
            return dict(loss=((out - targets) ** 2).mean()) if mode == 'loss' else out

    class ToyData(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return dict(inputs=torch.randn(2, generator=g), targets=torch.randn(1, generator=g))

    return Runner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=f'toy{max_iters}',
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume, log_level='WARNING')


@pytest.mark.compat
def test_runner_resumes_from_its_own_checkpoint(tmp_path):
    first = _toy_runner(tmp_path, 2, resume=False)
    first.train()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    # Loads under torch's default weights_only=True, message hub and numpy meta included.
    checkpoint = torch.load(tmp_path / 'iter_2.pth')
    assert checkpoint['meta']['iter'] == 2 and 'message_hub' in checkpoint

    second = _toy_runner(tmp_path, 4, resume=True)
    second.load_or_resume()
    assert second.iter == 2
    assert all(torch.equal(v, saved[k]) for k, v in second.model.state_dict().items())
    assert second.optim_wrapper.optimizer.state_dict()['state']   # momentum buffers came back
    second.train()
    assert second.iter == 4


def test_safe_globals_do_not_admit_arbitrary_objects(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'obj': _Toy()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def _setup_dry_run(**env):
    import os
    import subprocess
    from commands import ROOT
    env = dict({k: v for k, v in os.environ.items() if k != 'TORCH_CUDA_ARCH_LIST'}, DAT_MM_SETUP_DRY_RUN='1',
               DAT_MM_ASSUME_CUDA='13.0', DAT_MM_VENV=str(ROOT / '.venv'), DAT_MM_WHEEL_CACHE='/wheels', **env)
    return subprocess.run(['bash', str(ROOT / 'tools/setup_env.sh')], env=env, capture_output=True, text=True)


def test_setup_builds_mmcv_cuda_ops_with_a_cuda_torch(tmp_path):
    """The set-up's CUDA branch, on a CPU machine: a CUDA torch is assumed, FORCE_CUDA stands for the GPU this
    machine does not have, and nvcc is a stand-in."""
    nvcc = tmp_path / 'cuda' / 'bin' / 'nvcc'
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text('#!/bin/sh\nexit 0\n')
    nvcc.chmod(0o755)
    proc = _setup_dry_run(CUDA_HOME=str(tmp_path / 'cuda'), FORCE_CUDA='1')
    assert proc.returncode == 0, proc.stderr
    build = next(line for line in proc.stdout.splitlines() if 'pip wheel' in line)
    for part in ('FORCE_CUDA=1', 'MMCV_WITH_OPS=1', f'CUDA_HOME={tmp_path / "cuda"}', '--no-build-isolation',
                 '--no-cache-dir', 'TORCH_CUDA_ARCH_LIST=7.0;7.5;8.0;8.6;8.9;9.0', 'mmcv==2.1.0'):
        assert part in build
    # The CUDA version and the architectures are part of the wheel cache's key.
    assert '-cuda13.0-sm7_0_7_5_8_0_8_6_8_9_9_0' in proc.stdout
    proc = _setup_dry_run(CUDA_HOME=str(tmp_path / 'cuda'), TORCH_CUDA_ARCH_LIST='9.0', FORCE_CUDA='1')
    assert 'TORCH_CUDA_ARCH_LIST=9.0 ' in proc.stdout and '-cuda13.0-sm9_0' in proc.stdout


def test_setup_stops_when_a_cuda_torch_has_no_nvcc(tmp_path):
    proc = _setup_dry_run(CUDA_HOME=str(tmp_path), FORCE_CUDA='1')
    assert proc.returncode == 1
    assert 'nvcc was not found' in proc.stderr and 'CUDA 13.0' in proc.stderr and 'pip wheel' not in proc.stdout


def test_setup_compiles_cpu_ops_for_a_cuda_torch_on_a_machine_without_gpu(tmp_path):
    """PyPI's Linux torch is a CUDA build, CPU machines included: without a GPU (and without FORCE_CUDA) the
    set-up needs no nvcc and builds mmcv's CPU ops, cached apart from a CUDA build for the same torch."""
    proc = _setup_dry_run(CUDA_HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    build = next(line for line in proc.stdout.splitlines() if 'pip wheel' in line)
    assert 'MMCV_WITH_OPS=1' in build and 'FORCE_CUDA' not in build and 'CUDA_HOME' not in build
    assert 'no GPU is visible' in proc.stdout and '-cpu-ops' in proc.stdout


def test_importing_dat_mm_hides_the_stacks_pkg_resources_notice_and_nothing_else():
    """mmengine re-imports pkg_resources for every config with an mmdet:: base, and setuptools < 81 says each
    time that it will go: the demo printed it four times. A warning of any other kind still shows."""
    import os
    import subprocess
    import sys
    from commands import ROOT
    config = ROOT / 'configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py'
    code = ('import warnings{}\nfrom mmengine.config import Config\n'
            f'for _ in range(2):\n    Config.fromfile({str(config)!r})\nwarnings.warn("a real warning")\n')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    without, with_dat_mm = (subprocess.run([sys.executable, '-c', code.format(imports)], env=env, capture_output=True,
                                           text=True, check=True).stderr for imports in ('', '\nimport dat_mm'))
    assert without.count('pkg_resources is deprecated') >= 2 and 'a real warning' in without
    assert 'pkg_resources is deprecated' not in with_dat_mm and 'a real warning' in with_dat_mm
