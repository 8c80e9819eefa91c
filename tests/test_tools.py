"""The command-line tools: train / resume / test, checkpoint conversion, sampling-point visualisation."""
import argparse
import itertools
import json
import math
import os
import pickle
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from commands import ROOT, free_port, run_tool, tool_env
from dat_mm import DAT
from golden import arch_from_authors_kwargs, golden_model, load_bundle, stage_outputs

sys.path.insert(0, str(ROOT / 'tools'))
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))


SEGMENTOR = ROOT / 'configs/seg/demo/upernet_dat-mini_tiny-ade.py'


@pytest.fixture(scope='module')
def demo_checkpoints() -> dict:
    """The checkpoints test_train_resume_and_test_from_checkpoint wrote, by model, for later tests to reuse
    instead of training again."""
    return {}


def _drawings_match_images(drawings: list, images: list) -> None:
    """One drawing per image, named after it: the ground truth beside the prediction (both libraries'
    visualizers put them side by side), so as high as the image and twice as wide, and not blank."""
    assert len(drawings) == len(images), drawings
    for image in images:
        (drawing,) = [d for d in drawings if image.name in d.name]
        h, w = cv2.imread(str(image)).shape[:2]
        drawn = cv2.imread(str(drawing))
        assert drawn.shape == (h, 2 * w, 3) and drawn.any(), drawing


@pytest.mark.compat
@pytest.mark.parametrize('config,metric,val_images', [
    ('configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py', 'coco/bbox_mAP', 'coco/val'),
    ('configs/seg/demo/upernet_dat-mini_tiny-ade.py', 'mIoU', 'ade/images/validation')], ids=['detector', 'segmentor'])
def test_train_resume_and_test_from_checkpoint(config, metric, val_images, tiny_workspace, tmp_path, demo_checkpoints):
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

    # --out and --show-dir as each library's own test.py takes them: mmdet a pickle, and drawings under
    # WORK_DIR/<timestamp>/DIR; mmseg a folder of maps, and drawings under DIR/vis_data/vis_image.
    detector = metric.startswith('coco/')
    predictions = tmp_path / ('predictions.pkl' if detector else 'maps')
    show_dir = 'vis' if detector else tmp_path / 'vis'   # mmseg's DIR is the caller's: not the shared workspace
    out = run_tool([ROOT / 'tools/test.py', config, tmp_path / 'iter_4.pth', '--work-dir', tmp_path / 'test',
                    '--out', predictions, '--show-dir', show_dir], tiny_workspace)
    scores = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
    assert math.isfinite(scores[metric]) and scores[metric] >= 0
    demo_checkpoints[config.stem] = tmp_path / 'iter_4.pth'

    images = sorted((tiny_workspace / 'data' / 'tiny' / val_images).iterdir())
    if detector:
        with open(predictions, 'rb') as f:
            dumped = pickle.load(f)
        assert sorted(os.path.basename(p['img_path']) for p in dumped) == [i.name for i in images]
        assert all({'bboxes', 'scores', 'labels', 'masks'} <= set(p['pred_instances']) for p in dumped)
        drawings = list(tmp_path.glob('test/*/vis/*'))
    else:
        maps = sorted(predictions.iterdir())
        assert [m.name for m in maps] == [f'{i.stem}.png' for i in images]
        for image, seg_map in zip(images, maps):
            assert cv2.imread(str(seg_map), cv2.IMREAD_UNCHANGED).shape == cv2.imread(str(image)).shape[:2]
        drawings = list((tmp_path / 'vis' / 'vis_data' / 'vis_image').iterdir())
    _drawings_match_images(drawings, images)


def test_a_two_rank_test_prints_the_metrics_once(demo_checkpoints, tiny_workspace, tmp_path):
    """tools/dist_test.sh over 2 CPU ranks (gloo): each rank gets the metrics, rank 0 alone prints them; each
    rank writes the prediction maps of its share of the images."""
    checkpoint = demo_checkpoints.get(SEGMENTOR.stem)
    if checkpoint is None:   # run on its own, without the training test: a 1-iteration checkpoint
        run_tool([ROOT / 'tools/train.py', SEGMENTOR, '--work-dir', tmp_path, '--cfg-options', 'train_cfg.max_iters=1',
                  'default_hooks.checkpoint.interval=1', 'train_cfg.val_interval=100'], tiny_workspace)
        checkpoint = tmp_path / 'iter_1.pth'
    proc = subprocess.run(['bash', ROOT / 'tools/dist_test.sh', SEGMENTOR, checkpoint, '2', '--work-dir',
                           tmp_path / 'test', '--out', tmp_path / 'maps'], cwd=tiny_workspace,
                          env=tool_env(PYTHON=sys.executable, PORT=str(free_port())), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert 'in 2 processes over gloo' in out
    printed = [line for line in out.splitlines() if line.startswith("{'aAcc': ")]
    assert len(printed) == 1, printed
    assert 0 <= json.loads(printed[0].replace("'", '"'))['mIoU'] <= 100
    images = sorted((tiny_workspace / 'data/tiny/ade/images/validation').iterdir())
    assert sorted(m.name for m in (tmp_path / 'maps').iterdir()) == [f'{i.stem}.png' for i in images]


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


@pytest.mark.compat
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


@pytest.mark.compat
def test_converter_refuses_unknown_keys(tmp_path):
    bundle = load_bundle('v1')
    bad = tmp_path / 'bad.pth'
    torch.save({'model': {**bundle['state_dict'], 'stages.0.attns.0.mystery': torch.zeros(3)}}, bad)
    proc = subprocess.run([sys.executable, ROOT / 'tools/convert_checkpoint.py', bad, tmp_path / 'out.pth',
                           '--arch', json.dumps(arch_from_authors_kwargs(json.loads(bundle['kwargs'])))],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'stages.0.attns.0.mystery' in proc.stderr
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.compat
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


def _slurm_cases():
    """Every combination of SRUN_ARGS set or unset, a WORK_DIR or none (slurm_train.sh), extra arguments or none:
    the empty ones are what bash < 4.4 calls unbound under set -u where an empty array is expanded plainly."""
    srun_args = {'srun-args': ('--quotatype=spot  --time=48:00:00', ['--quotatype=spot', '--time=48:00:00']),
                 'no-srun-args': (None, [])}
    for (srun_id, (value, words)), extra in itertools.product(srun_args.items(), (True, False)):
        extra_id = 'extra' if extra else 'no-extra'
        more = ['--amp', '--resume'] if extra else []
        for work in ([], ['work']):
            yield pytest.param('slurm_train.sh', ['gpu', 'dat', 'CFG.py', *work, *more], 'train.py',
                               ['CFG.py', *(['--work-dir', *work] if work else []), *more], value, words,
                               id=f'train-{srun_id}-{"work-dir" if work else "no-work-dir"}-{extra_id}')
        more = ['--tta'] if extra else []
        yield pytest.param('slurm_test.sh', ['gpu', 'dat', 'CFG.py', 'CKPT.pth', *more], 'test.py',
                           ['CFG.py', 'CKPT.pth', *more], value, words, id=f'test-{srun_id}-{extra_id}')


@pytest.mark.parametrize('script,args,tool,rest,srun_args,srun_words', list(_slurm_cases()))
def test_slurm_scripts_hand_srun_the_allocation(script, args, tool, rest, srun_args, srun_words, tmp_path):
    """OpenMMLab's convention (PARTITION JOB_NAME CONFIG ..., GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS); a
    stand-in srun on PATH records what it was given."""
    srun = tmp_path / 'srun'
    srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', PYTHON='python3', GPUS='16', GPUS_PER_NODE='8',
               CPUS_PER_TASK='4')
    env.pop('SRUN_ARGS', None)
    if srun_args is not None:
        env['SRUN_ARGS'] = srun_args
    out = subprocess.run(['bash', ROOT / 'tools' / script, *args], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ['-p', 'gpu', '--job-name=dat', '--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8',
                   '--cpus-per-task=4', '--kill-on-bad-exit=1', *srun_words,
                   'python3', '-u', str(ROOT / 'tools' / tool), *rest, '--launcher', 'slurm']


def _arrays_empty_under_set_u(script: str) -> set:
    """The arrays a bash script expands plainly (``"${NAME[@]}"``, ``${NAME[*]}``) under set -u although they
    may hold no element, which bash < 4.4 (RHEL/CentOS 7 ship 4.2) stops at as unbound; bash 5 lets it pass.

    Safe: ``${NAME[@]+"${NAME[@]}"}``, and arrays that every assignment gives a first element that cannot
    vanish (``PIP=("$VENV/bin/python" ...)``); unsafe: ``NAME=()``, ``read -a NAME``, mapfile, or no assignment."""
    code = '\n'.join(line for line in script.splitlines() if not line.lstrip().startswith('#'))
    if not re.search(r'^\s*set\s+(-\w*u|-o\s+nounset)', code, re.M):
        return set()
    def may_vanish(word: str) -> bool:   # the first word of NAME=(...): none, an unquoted $X, or "${X[@]}"
        return word.startswith((')', '$')) or not word or bool(re.match(r'"\$\{\w+\[[@*]\]\}"', word))

    unsafe = set()
    for name in set(re.findall(r'(?<!\+)(?<!\+")\$\{(\w+)\[[@*]\]\}', code)):
        firsts = re.findall(rf'(?<![\w+]){name}=\(\s*(\S*)', code)
        filled = re.search(rf'\b(read|mapfile|readarray)\b[^\n;|&]*\b{name}\b', code)
        if filled or not firsts or any(may_vanish(w) for w in firsts):
            unsafe.add(name)
    return unsafe


def test_no_shell_tool_expands_a_possibly_empty_array_under_set_u():
    """bash 4.2 is not installed here, so this reads the scripts for what it would stop at."""
    assert _arrays_empty_under_set_u('set -euo pipefail\nA=()\nf "${A[@]}"\n') == {'A'}
    assert _arrays_empty_under_set_u('set -eu\nread -r -a B <<< "$X"\nf ${B[@]+"${B[@]}"} "${B[*]}"\n') == {'B'}
    assert _arrays_empty_under_set_u('set -u\nC=("$X" -m)\nC+=(--q)\nf "${C[@]}" ${C[@]+"${C[@]}"}\n') == set()
    scripts = sorted((ROOT / 'tools').rglob('*.sh'))
    assert {'srun.sh', 'slurm_train.sh', 'setup_env.sh'} <= {s.name for s in scripts}
    found = {s.name: names for s in scripts if (names := _arrays_empty_under_set_u(s.read_text()))}
    assert found == {}


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


def test_benchmark_compile_adds_a_compiled_row_after_each_row():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: the CUDA mode would measure')
    out = run_tool([ROOT / 'tools/analysis/benchmark.py', '--device', 'cuda', '--sizes', '1344x800', '--modes',
                    'fwd+bwd', '--models', 'DAT-T++ fast', 'Swin-T', '--compile'], ROOT)
    listed = re.findall(r'1344x800 fwd\+bwd fp32 (.+)', out)
    assert listed == ['DAT-T++ fast', 'DAT-T++ fast compiled', 'DAT-T++ fast (cpu plan)',
                      'DAT-T++ fast (cpu plan) compiled', 'Swin-T', 'Swin-T compiled'], listed


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
