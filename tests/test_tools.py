"""The command-line tools: train / resume / test, checkpoint conversion, sampling-point visualisation."""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from commands import ROOT, run_tool
from dat_mm import DAT
from golden import arch_from_authors_kwargs, golden_model, load_bundle, stage_outputs

sys.path.insert(0, str(ROOT / 'tools'))
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))


@pytest.mark.parametrize('config,metric', [
    ('configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py', 'coco/bbox_mAP'),
    ('configs/seg/demo/upernet_dat-mini_tiny-ade.py', 'mIoU')], ids=['detector', 'segmentor'])
def test_train_resume_and_test_from_checkpoint(config, metric, tiny_workspace, tmp_path):
    config = ROOT / config
    short = ['default_hooks.checkpoint.interval=1', 'train_cfg.val_interval=100']
    run_tool([ROOT / 'tools/train.py', config, '--work-dir', tmp_path, '--cfg-options', 'train_cfg.max_iters=2',
              *short], tiny_workspace)
    assert (tmp_path / 'iter_2.pth').exists()
    first = torch.load(tmp_path / 'iter_2.pth')
    assert first['meta']['iter'] == 2

    out = run_tool([ROOT / 'tools/train.py', config, '--work-dir', tmp_path, '--resume', '--cfg-options',
                    'train_cfg.max_iters=4', *short], tiny_workspace)
    assert re.search(r'resumed epoch: \d+, iter: 2', out)
    resumed = torch.load(tmp_path / 'iter_4.pth')
    assert resumed['meta']['iter'] == 4
    # The optimizer went on from its saved state: Adam's step counter continued from 2.
    steps = {int(s['step']) for s in resumed['optimizer']['state'].values()}
    assert steps == {4}

    out = run_tool([ROOT / 'tools/test.py', config, tmp_path / 'iter_4.pth', '--work-dir', tmp_path / 'test'],
                   tiny_workspace)
    scores = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
    assert math.isfinite(scores[metric]) and scores[metric] >= 0


def test_train_refuses_a_missing_resume_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, ROOT / 'tools/train.py', ROOT / 'configs/seg/demo/upernet_dat-mini_tiny-ade.py',
                           '--resume', tmp_path / 'nope.pth'], capture_output=True, text=True)
    assert proc.returncode != 0 and 'checkpoint not found' in proc.stderr


def _authors_checkpoints(tmp_path):
    bundle = load_bundle('v1')
    sd = bundle['state_dict']
    imagenet = tmp_path / 'imagenet.pth'
    torch.save({'model': sd, 'epoch': 300}, imagenet)
    detector = tmp_path / 'detector.pth'
    torch.save({'state_dict': {**{f'backbone.{k}': v for k, v in sd.items()},
                               'neck.fpn_convs.0.conv.weight': torch.ones(2, 2)},
                'meta': {'mmcv_version': '1.7.0', 'CLASSES': ('a', 'b'), 'epoch': 12}}, detector)
    return bundle, imagenet, detector


def test_converter_round_trips_to_identical_backbone_outputs(tmp_path):
    from convert_checkpoint import convert
    bundle, imagenet, detector = _authors_checkpoints(tmp_path)
    arch = arch_from_authors_kwargs(json.loads(bundle['kwargs']))
    x = bundle['cases']['224x224_b2']['input'].float()

    reference, _ = golden_model('v1', torch.float32)
    with torch.no_grad():
        expected = stage_outputs(reference, x)

    convert(str(imagenet), str(tmp_path / 'backbone.pth'), arch)
    from_imagenet = DAT(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'backbone.pth')))
    from_imagenet.init_weights()

    weights = convert(str(detector), str(tmp_path / 'model.pth'), arch)
    assert 'neck.fpn_convs.0.conv.weight' in weights and not any(k.startswith('cls_') for k in weights)
    saved = torch.load(tmp_path / 'model.pth')   # weights_only loading, as load_from does
    from_detector = DAT(arch=arch).eval()
    from_detector.load_state_dict({k[9:]: v for k, v in saved['state_dict'].items() if k.startswith('backbone.')},
                                  strict=False)
    for model in (from_imagenet.eval(), from_detector):
        with torch.no_grad():
            outs = stage_outputs(model, x)
        assert all(torch.equal(a, b) for a, b in zip(outs, expected))


def test_converter_refuses_unknown_keys(tmp_path):
    bundle = load_bundle('v1')
    bad = tmp_path / 'bad.pth'
    torch.save({'model': {**bundle['state_dict'], 'stages.0.attns.0.mystery': torch.zeros(3)}}, bad)
    proc = subprocess.run([sys.executable, ROOT / 'tools/convert_checkpoint.py', bad, tmp_path / 'out.pth',
                           '--arch', json.dumps(arch_from_authors_kwargs(json.loads(bundle['kwargs'])))],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'stages.0.attns.0.mystery' in proc.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_converter_refuses_pickled_objects(tmp_path):
    from convert_checkpoint import read_checkpoint
    path = tmp_path / 'objects.pth'
    torch.save({'model': {}, 'args': argparse.Namespace(lr=0.1)}, path)   # as some training scripts save
    with pytest.raises(SystemExit, match='refusing to unpickle'):
        read_checkpoint(str(path))


@pytest.mark.parametrize('entry', ['build_model', 'infer'])
def test_a_config_of_another_codebase_is_refused_by_name(tmp_path, entry):
    config = tmp_path / 'classifier.py'
    config.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='ImageClassifier')\n")
    from mmengine.config import Config
    from dat_mm.runner import build_model
    from infer import build_inferencer
    with pytest.raises(SystemExit, match=r"classifier\.py: default_scope is 'mmpretrain'; expected an mmdet or mmseg"):
        build_model(Config.fromfile(config)) if entry == 'build_model' else build_inferencer(str(config))


def test_points_map_to_the_pixels_the_features_cover():
    from dat_mm.visualization import points_to_pixels
    # A 4-pixel-wide feature map at stride 8 over 32 image pixels: -1 and 1 are the centres of its first and
    # last pixels, i.e. image x = 3.5 and 27.5.
    pts = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(points_to_pixels(pts, (4, 4), (32, 32)),
                          torch.tensor([[3.5, 3.5], [27.5, 27.5], [15.5, 15.5]]))


def test_visualiser_draws_the_points_the_model_returns(tmp_path):
    from dat_mm.visualization import block_pixels, forward_with_points
    from visualize_sampling import visualize
    torch.manual_seed(0)
    arch = arch_from_authors_kwargs(json.loads(load_bundle('pp')['kwargs']))
    model = DAT(arch=arch)
    model.init_weights()
    model.eval()
    image = np.zeros((96, 128, 3), np.uint8)
    paths = visualize(model, image, [(2, 1)], tmp_path, radius=0)
    drawn = cv2.imread(str(paths[0]))
    assert paths[0].stat().st_size > 0 and drawn.shape == image.shape

    x = torch.zeros(1, 3, 96, 128)
    x[:] = torch.tensor([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375])[:, None, None]
    shapes, points = forward_with_points(model, x)
    pixels = block_pixels(points, shapes, (96, 128), 2, 1)
    expected = set()
    for pts in pixels:
        for px, py in np.round(pts).astype(int):
            if 0 <= px < 128 and 0 <= py < 96:
                expected.add((py, px))
                assert drawn[py, px].any(), (py, px)
    lit = set(zip(*np.nonzero(drawn.any(axis=2))))
    assert lit == expected


@pytest.mark.parametrize('script,args', [('dist_train.sh', ['CFG.py', '8', '--amp']),
                                         ('dist_test.sh', ['CFG.py', 'CKPT.pth', '8', '--tta'])])
def test_dist_scripts_hand_torchrun_the_node_layout(script, args, tmp_path):
    """MMEngine's pytorch launcher needs GPUs, so here a stand-in python records what torchrun was given."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), NNODES='2', NODE_RANK='1', MASTER_ADDR='10.1.2.3', PORT='29601')
    out = subprocess.run(['bash', ROOT / 'tools' / script, *args], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    tool = 'train.py' if script == 'dist_train.sh' else 'test.py'
    assert out[:7] == ['-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1', '--master_addr=10.1.2.3',
                       '--master_port=29601', '--nproc_per_node=8']
    assert out[7] == str(ROOT / 'tools' / tool)
    rest = [a for a in args if a != '8']
    assert out[8:] == rest + ['--launcher', 'pytorch']


@pytest.mark.parametrize('script,args,tool,rest', [
    ('slurm_train.sh', ['gpu', 'dat', 'CFG.py', 'work', '--amp'], 'train.py', ['CFG.py', '--work-dir', 'work', '--amp']),
    ('slurm_train.sh', ['gpu', 'dat', 'CFG.py', '--resume'], 'train.py', ['CFG.py', '--resume']),
    ('slurm_test.sh', ['gpu', 'dat', 'CFG.py', 'CKPT.pth', '--tta'], 'test.py', ['CFG.py', 'CKPT.pth', '--tta'])])
def test_slurm_scripts_hand_srun_the_allocation(script, args, tool, rest, tmp_path):
    """OpenMMLab's convention (PARTITION JOB_NAME CONFIG ..., GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS); a
    stand-in srun on PATH records what it was given."""
    srun = tmp_path / 'srun'
    srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', PYTHON='python3', GPUS='16', GPUS_PER_NODE='8',
               CPUS_PER_TASK='4', SRUN_ARGS='--quotatype=spot  --time=48:00:00')
    out = subprocess.run(['bash', ROOT / 'tools' / script, *args], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ['-p', 'gpu', '--job-name=dat', '--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8',
                   '--cpus-per-task=4', '--kill-on-bad-exit=1', '--quotatype=spot', '--time=48:00:00',
                   'python3', '-u', str(ROOT / 'tools' / tool), *rest, '--launcher', 'slurm']


def test_a_coco_zoo_config_trains_on_a_coco_folder(tiny_workspace, tmp_path):
    """A user's first run: a COCO config from the zoo, pointed at their own COCO-format folder."""
    data = tiny_workspace / 'data' / 'tiny' / 'coco'
    folders = []
    for split, loader in (('train', 'train_dataloader'), ('val', 'val_dataloader')):
        ds = f'{loader}.dataset.'
        folders += [f'{ds}data_root={data}/', f'{ds}ann_file={split}.json', f'{ds}data_prefix.img={split}/',
                    f'{ds}metainfo.classes=[square,circle,triangle]']
    run_tool([ROOT / 'tools/train.py', ROOT / 'configs/det/retinanet_dat-t++_fpn_ms-crop-1x_coco.py',
              '--work-dir', tmp_path, '--cfg-options', *folders, f'val_evaluator.ann_file={data}/val.json',
              'model.backbone.init_cfg=None', 'optim_wrapper.type=OptimWrapper',   # no ImageNet weights; no AMP on CPU
              'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
              'train_cfg.max_epochs=1', 'train_cfg.val_interval=10',
              'train_dataloader.dataset.indices=2'], tiny_workspace)   # one full-size batch is enough to show it
    checkpoint = torch.load(tmp_path / 'epoch_1.pth')
    assert checkpoint['meta']['epoch'] == 1 and checkpoint['meta']['iter'] == 1   # 2 images, 2 per batch
    assert any(k.startswith('backbone.stages.0.attns.1.rpe_table') for k in checkpoint['state_dict'])


def test_flops_tool_prints_the_issue_checks_for_mask_rcnn_dat_t():
    out = run_tool([ROOT / 'tools/analysis/get_flops.py', ROOT / 'configs/det/mask-rcnn_dat-t_fpn_1x_coco.py'],
                   ROOT)
    row = next(line for line in out.splitlines() if line.startswith('mask-rcnn_dat-t_fpn_1x_coco.py'))
    param_diff, flops_diff = (float(d) for d in re.findall(r'PASS ([+-][\d.]+)%', row))
    assert abs(param_diff) <= 2 and abs(flops_diff) <= 5     # 48M and 272G, attention products counted
    assert '0 check(s) outside tolerance' in out


@pytest.mark.parametrize('arch', ['tiny', 'small', 'tiny++'])
def test_flops_count_attention_products_as_the_papers_do(arch):
    # Without the attention products DAT-T/S would come out 2-3 % low (4.50G, 8.74G).
    from get_flops import IMAGENET, imagenet_row
    params, flops, _ = imagenet_row(arch)
    paper_params, paper_flops = IMAGENET[arch]
    assert abs(params - paper_params) / paper_params < 0.005
    assert abs(flops - paper_flops) / paper_flops < 0.01


@pytest.mark.parametrize('config', ['configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py',
                                    'configs/seg/demo/upernet_dat-mini_tiny-ade.py'], ids=['detector', 'segmentor'])
def test_infer_draws_predictions_through_the_mm_inferencers(config, tmp_path):
    from make_tiny_dataset import make_scene
    image, _, _ = make_scene(np.random.default_rng(3), 96)
    path = tmp_path / 'scene.png'
    cv2.imwrite(str(path), image[..., ::-1])
    # Random weights: a detector's scores sit near 1 / (classes + 1), so every box it keeps is drawn.
    out = run_tool([ROOT / 'tools/infer.py', path, ROOT / config, '--out-dir', tmp_path / 'out', '--score-thr', '0'],
                   tmp_path)
    drawn_path = tmp_path / 'out' / 'vis' / 'scene.png'
    assert str(drawn_path) in out
    drawn = cv2.imread(str(drawn_path))
    # The inferencer's visualizer drew its prediction over the image: same size, not the same pixels.
    assert drawn.shape == image.shape and not np.array_equal(drawn, image[..., ::-1])


def test_infer_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, ROOT / 'tools/infer.py', ROOT / 'docs/demo_detector.jpg',
                           ROOT / 'configs/seg/demo/upernet_dat-mini_tiny-ade.py', tmp_path / 'nope.pth'],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'Checkpoint not found' in proc.stderr


def test_benchmark_cuda_mode_is_a_dry_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: the CUDA mode would measure')
    out = run_tool([ROOT / 'tools/analysis/benchmark.py', '--device', 'cuda', '--sizes', '1344x800', '--modes', 'fwd',
                    '--dtypes', 'fp32', 'bf16'], ROOT)
    assert 'needs a GPU' in out
    listed = re.findall(r'1344x800 fwd +(?:fp32|bf16) (.+)', out)
    # Every model, and the three fast ones in both attention plans (the device plan is CUDA's own); nothing measured.
    assert len(listed) == 18 and listed.count('DAT-T++ fast (cpu plan)') == 2 and listed.count('DAT-T++ fast') == 2
    assert '| size |' not in out


def test_benchmark_gives_ratios_against_swin_in_both_precisions():
    out = run_tool([ROOT / 'tools/analysis/benchmark.py', '--device', 'cpu', '--sizes', '96x64', '--reps', '1',
                    '--modes', 'fwd+bwd', '--dtypes', 'fp32', 'bf16', '--models', 'DAT-T++ fast', 'Swin-T'], ROOT)
    rows = [line.split(' | ') for line in out.splitlines() if line.startswith('| 96x64 ')]
    assert [(r[2], r[3]) for r in rows] == [('fp32', 'DAT-T++ fast'), ('fp32', 'Swin-T (mmdet)'),
                                            ('bf16', 'DAT-T++ fast'), ('bf16', 'Swin-T (mmdet)')]
    for dat in (rows[0], rows[2]):
        assert re.fullmatch(r'\d+\.\d\dx', dat[6]) and re.fullmatch(r'\d+\.\d\dx', dat[7]), dat


def test_benchmark_rounds_alternate_and_give_the_median_ratio_with_its_range():
    out = run_tool([ROOT / 'tools/analysis/benchmark.py', '--device', 'cpu', '--sizes', '96x64', '--reps', '1',
                    '--modes', 'fwd', '--rounds', '2', '--models', 'DAT-T++ fast', 'Swin-T'], ROOT)
    order = re.findall(r'96x64 fwd +fp32 (DAT-T\+\+ fast|Swin-T) .* round (\d)', out)
    assert order == [('DAT-T++ fast', '1'), ('Swin-T', '1'), ('Swin-T', '2'), ('DAT-T++ fast', '2')]
    row = next(line.split(' | ') for line in out.splitlines() if line.startswith('| 96x64 | fwd | fp32 | DAT-T++'))
    median, low, high = map(float, re.fullmatch(r'(\d+\.\d\d)x \((\d+\.\d\d)-(\d+\.\d\d)x\)', row[6]).groups())
    assert low <= median <= high


def test_count_ops_gives_launches_and_host_syncs_against_swin():
    out = run_tool([ROOT / 'tools/analysis/count_ops.py', '--sizes', '128x96', '--models', 'DAT-T++', 'Swin-T'], ROOT)
    rows = {r[1]: r for r in (line.split(' | ') for line in out.splitlines() if line.startswith('| 128x96 | '))}
    assert set(rows) == {'DAT-T++', 'Swin-T (mmdet)'}
    dat = rows['DAT-T++']
    assert dat[2] == 'device', 'the GPU plan is the one counted by default'
    assert all(re.fullmatch(r'\d+\.\d\dx', ratio) for ratio in dat[6:8]), dat
    assert dat[8] == '0', 'the device plan reads nothing back'
