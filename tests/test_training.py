"""The training path beyond one uninterrupted process: two ranks over gloo, a killed run resumed, MMEngine's compile."""
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import dat_mm  # noqa: F401  (makes MMEngine checkpoints loadable under weights_only)
from commands import ROOT, free_port, run_tool, tool_env
from configs import build_model, load_config

SEGMENTOR = ROOT / 'configs/seg/demo/upernet_dat-mini_tiny-ade.py'

# A hook that writes what its rank saw and held: the images of every batch, the parameters before and
# after training. Registered in MMEngine's root registry, which mmseg's registry falls back to.
RECORDER = '''
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def _params(runner):
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@HOOKS.register_module()
class RecordRankHook(Hook):
    def before_train(self, runner):
        self.images, self.before = [], _params(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.images += [sample.img_path for sample in data_batch['data_samples']]

    def after_train(self, runner):
        torch.save(dict(world_size=runner.world_size, images=self.images, before=self.before,
                        after=_params(runner)), f'{runner.work_dir}/rank{runner.rank}.pt')
'''


def _recorded_config(tmp_path):
    """The demo segmentor with RecordRankHook, whose module is importable from ``tmp_path``."""
    (tmp_path / 'record_rank_hook.py').write_text(RECORDER)
    config = tmp_path / 'recorded.py'
    config.write_text(f"_base_ = '{SEGMENTOR}'\ncustom_imports = dict(imports=['dat_mm', 'record_rank_hook'])\n"
                      "custom_hooks = [dict(type='RecordRankHook')]\n")
    return config


def _assert_ranks_took_the_same_steps(ranks: list) -> None:
    """DDP averaged the gradients, so every rank took identical steps away from the same start."""
    for name, value in ranks[0]['after'].items():
        assert torch.equal(value, ranks[1]['after'][name]), name
        assert torch.equal(ranks[0]['before'][name], ranks[1]['before'][name]), name
    moved = [n for n, v in ranks[0]['after'].items() if not torch.equal(v, ranks[0]['before'][n])]
    assert len(moved) > 0.9 * len(ranks[0]['after'])


def test_two_cpu_ranks_train_one_model_and_resume(tiny_workspace, tmp_path):
    config = _recorded_config(tmp_path)
    work = tmp_path / 'work'
    env = tool_env(PYTHON=sys.executable, PORT=str(free_port()), PYTHONPATH=str(tmp_path))

    def dist_train(max_iters, *extra):
        proc = subprocess.run(['bash', ROOT / 'tools/dist_train.sh', config, '2', '--work-dir', work, *extra,
                               '--cfg-options', f'train_cfg.max_iters={max_iters}',
                               'default_hooks.checkpoint.interval=3', 'train_cfg.val_interval=100',
                               'default_hooks.logger.interval=1'],
                              cwd=tiny_workspace, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    out = dist_train(3)
    assert 'Distributed training: True' in out and 'GPU number: 2' in out   # MMEngine's word for world size
    ranks = [torch.load(work / f'rank{r}.pt') for r in range(2)]
    assert [r['world_size'] for r in ranks] == [2, 2]
    # 3 iterations x 4 images per rank. The sampler deals each shuffled pass over the 6 training images
    # out between the ranks: 3 each, none seen by both.
    assert all(len(r['images']) == 12 for r in ranks)
    for start in range(0, 12, 3):
        first, second = (set(r['images'][start:start + 3]) for r in ranks)
        assert len(first) == len(second) == 3 and not first & second
    _assert_ranks_took_the_same_steps(ranks)
    # Rank 0 wrote the checkpoint, with the weights both ranks hold.
    checkpoint = torch.load(work / 'iter_3.pth')
    assert all(torch.equal(checkpoint['state_dict'][n], v) for n, v in ranks[0]['after'].items())

    out = dist_train(5, '--resume')
    assert re.search(r'resumed epoch: \d+, iter: 3', out)
    assert torch.load(work / 'iter_5.pth')['meta']['iter'] == 5
    resumed = torch.load(work / 'rank0.pt')
    assert all(torch.equal(resumed['before'][n], v) for n, v in ranks[0]['after'].items())


def test_two_nodes_on_loopback_train_as_one_job(tiny_workspace, tmp_path):
    """Two launches of tools/dist_train.sh CONFIG 1, as two machines of one node each would run them
    (NNODES=2, NODE_RANK=0 and 1, one MASTER_ADDR and PORT), here on loopback over gloo."""
    config = _recorded_config(tmp_path)
    work = tmp_path / 'work'
    port = str(free_port())
    nodes = [subprocess.Popen(['bash', ROOT / 'tools/dist_train.sh', config, '1', '--work-dir', work, '--cfg-options',
                               'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
                               'train_cfg.val_interval=100'], cwd=tiny_workspace,
                              env=tool_env(PYTHON=sys.executable, NNODES='2', NODE_RANK=str(rank),
                                           MASTER_ADDR='127.0.0.1', PORT=port, PYTHONPATH=str(tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ranks = [torch.load(work / f'rank{r}.pt') for r in range(2)]
    assert [r['world_size'] for r in ranks] == [2, 2]
    _assert_ranks_took_the_same_steps(ranks)
    assert sorted(p.name for p in work.glob('*.pth')) == ['iter_2.pth'], 'one checkpoint, from rank 0'
    checkpoint = torch.load(work / 'iter_2.pth')
    assert all(torch.equal(checkpoint['state_dict'][n], v) for n, v in ranks[1]['after'].items())


def test_sync_bn_configs_say_they_need_gpus_on_a_cpu_launch(tmp_path):
    config = ROOT / 'configs/det/cascade-mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py'
    env = tool_env(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, ROOT / 'tools/train.py', config, '--launcher', 'pytorch',
                           '--work-dir', tmp_path], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and 'SyncBN, which torch runs on GPUs only' in proc.stderr


def test_a_killed_run_resumes_to_the_configured_end(tiny_workspace, tmp_path):
    args = [sys.executable, ROOT / 'tools/train.py', SEGMENTOR, '--work-dir', tmp_path, '--cfg-options',
            'train_cfg.max_iters=8', 'default_hooks.checkpoint.interval=3', 'train_cfg.val_interval=100',
            'default_hooks.logger.interval=1']
    proc = subprocess.Popen(args, cwd=tiny_workspace, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:   # kill it at iteration 4, between the checkpoints of iterations 3 and 6
        seen.append(line)
        if re.search(r'Iter\(train\) \[4/8\]', line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, ''.join(seen)[-3000:]
    assert (tmp_path / 'iter_3.pth').exists() and not (tmp_path / 'iter_6.pth').exists()

    out = run_tool([*args[1:], '--resume'], tiny_workspace)
    assert re.search(r'resumed epoch: \d+, iter: 3', out)
    final = torch.load(tmp_path / 'iter_8.pth')
    assert final['meta']['iter'] == 8
    model = build_model(load_config('seg/demo', SEGMENTOR.name), 'mmseg')
    model.load_state_dict(final['state_dict'])   # strict: every key present, every shape right


def test_resume_passes_over_a_torn_checkpoint_and_never_starts_over_unnoticed(tiny_workspace, tmp_path):
    """A node that crashed while saving leaves a truncated checkpoint, here the one last_checkpoint names."""
    def train(max_iters, *extra):
        return subprocess.run([sys.executable, ROOT / 'tools/train.py', SEGMENTOR, '--work-dir', tmp_path, *extra,
                               '--cfg-options', f'train_cfg.max_iters={max_iters}', 'train_cfg.val_interval=100',
                               'default_hooks.checkpoint.interval=1'],
                              cwd=tiny_workspace, env=tool_env(), capture_output=True, text=True)

    assert train(3).returncode == 0
    torn = tmp_path / 'iter_3.pth'
    assert (tmp_path / 'last_checkpoint').read_text().strip() == str(torn)
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    proc = train(4, '--resume')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f'--resume: warning: {torn} does not load' in out
    assert re.search(r'resumed epoch: \d+, iter: 2', out)
    assert torch.load(tmp_path / 'iter_4.pth')['meta']['iter'] == 4

    for checkpoint in tmp_path.glob('*.pth'):
        checkpoint.write_bytes(b'')
    proc = train(5, '--resume')
    assert proc.returncode != 0
    assert f'--resume: no checkpoint in {tmp_path} loads' in proc.stderr and 'iter_4.pth' in proc.stderr
    assert not re.search(r'Iter\(train\)', proc.stdout + proc.stderr), 'it trained'


DETECTOR = ROOT / 'configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py'


def _logged_losses(log: str, iteration: int) -> dict:
    """The losses MMEngine logged at ``iteration`` (averages over the logging interval)."""
    line = re.search(rf'Iter\(train\) \[\s*{iteration}/\d+\].*', log).group(0)
    return {name: float(value) for name, value in re.findall(r'(loss\w*): ([\d.]+)', line)}


def test_the_demo_detector_learns_the_shapes(tiny_workspace, tmp_path):
    """60 iterations on the six tiny images. Untrained, Mask R-CNN's RoI classification loss is ln 4 = 1.39
    and its total about 4.2; with scrambled RoI features (channels-last backbone outputs read by mmcv's
    RoIAlign as NCHW) the same run stalled at 1.0 and 3.3, its RPN learning while its RoI heads could not."""
    log = run_tool([ROOT / 'tools/train.py', DETECTOR, '--work-dir', tmp_path, '--cfg-options',
                    'train_cfg.max_iters=60', 'train_cfg.val_interval=1000', 'default_hooks.logger.interval=10',
                    'default_hooks.checkpoint.interval=1000', 'randomness.seed=0'], tiny_workspace)
    start, end = _logged_losses(log, 10), _logged_losses(log, 60)
    assert start['loss_cls'] > 1.0 and start['loss'] > 3.5, start
    assert end['loss_cls'] < 0.6 and end['loss_mask'] < 0.6 and end['loss'] < 2.9, end


def test_compiled_training_steps_the_optimizer_eagerly_as_its_learning_rate_changes(capsys, inductor_defaults):
    # MMEngine's compile traces train_step, optimizer step included. Dynamo cannot trace param groups that are
    # ConfigDicts, which MMEngine builds from every paramwise_cfg, and each new learning rate would compile the
    # step again. tools/train.py adds a hook that keeps the step eager.
    from types import SimpleNamespace

    from mmengine.config import Config, ConfigDict
    from mmengine.optim import build_optim_wrapper

    from dat_mm.runner import EagerOptimizerStepHook, prepare_compile
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4))
    wrapper = build_optim_wrapper(model, ConfigDict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    assert all(isinstance(group, ConfigDict) for group in wrapper.optimizer.param_groups)
    EagerOptimizerStepHook().before_train(SimpleNamespace(optim_wrapper=wrapper))

    def step(x):
        wrapper.update_params(model(x).square().mean())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend='eager')
    for lr in (1e-3, 2e-3, 3e-3):
        for group in wrapper.optimizer.param_groups:
            group['lr'] = lr
        weight = model[0].weight.detach().clone()
        compiled(torch.randn(2, 3, 5, 5))
        assert not torch.equal(model[0].weight, weight)
    # One graph before the step and one after its graph break, each compiled once for all three rates.
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] <= 2, dict(torch._dynamo.utils.counters['stats'])

    # Shapes: torch's policy (dynamic=None) unless the config chooses, with one line saying so. Where sizes may turn
    # symbolic, inductor's convolution backward through ATen and, on CPU, its layout optimization and C++
    # vectorization off and its sums chunked without a size guard, with one line; torch's settings untouched
    # otherwise.
    import torch._inductor.config as inductor_config
    from torch._inductor import lowering
    from torch._inductor.codegen import cpp
    reset = inductor_defaults
    own, own_sums = reset.own_lowering, reset.own_sums   # torch 2.13's; older ones have neither
    op = torch.ops.aten.convolution_backward.default
    cpu = not torch.cuda.is_available()

    def assert_applied(applied: bool) -> None:
        if own:
            assert (lowering.lowerings[op] is own) == (not applied)
        if own_sums and cpu:
            assert (cpp.CppKernel.need_use_acc_helper is own_sums) == (not applied)
        assert inductor_config.layout_optimization == (not (applied and cpu))
        assert inductor_config.cpp.simdlen == (1 if applied and cpu else None)

    for compile, hooks, dynamic in ((False, ['EMAHook'], False),
                                    (True, ['EMAHook', 'EagerOptimizerStepHook'], None),
                                    (dict(backend='inductor'), ['EMAHook', 'EagerOptimizerStepHook'], None),
                                    (dict(dynamic=None), ['EMAHook', 'EagerOptimizerStepHook'], None),
                                    (dict(dynamic=True), ['EMAHook', 'EagerOptimizerStepHook'], True),
                                    (dict(dynamic=False), ['EMAHook', 'EagerOptimizerStepHook'], False)):
        reset()
        cfg = Config(dict(compile=compile, custom_hooks=[dict(type='EMAHook')]))
        prepare_compile(cfg)
        prepare_compile(cfg)
        assert [hook['type'] for hook in cfg.custom_hooks] == hooks
        if compile:
            assert 'dynamic' in cfg.compile and cfg.compile.dynamic == dynamic
        symbolic = bool(compile) and dynamic is not False
        assert_applied(symbolic)
        printed = capsys.readouterr().out
        changes = ['convolution backward through ATen'] * bool(own) + \
            ['layout optimization off', 'C++ vectorization off'] * cpu + ['chunked sums on symbolic sizes'] * \
            bool(cpu and own_sums)
        line = 'compile: inductor for symbolic sizes: ' + ', '.join(changes) + ' ('
        assert printed.count(line) == int(symbolic), printed
        defaulted = compile is True or (isinstance(compile, dict) and 'dynamic' not in compile)
        assert printed.count('compile: dynamic=None') == int(defaulted), printed

    # Settings the user chose stay theirs.
    reset()
    inductor_config.layout_optimization, inductor_config.cpp.simdlen = False, 512
    prepare_compile(Config(dict(compile=True)))
    assert inductor_config.cpp.simdlen == 512 and not inductor_config.layout_optimization

    # The same settings for mmdet's and mmseg's own train tools, from a hook in the config: where it compiles
    # and dynamic is not False.
    from dat_mm import InductorSymbolicSizesHook
    for compile, applied in ((False, False), (dict(dynamic=False), False), (True, True)):
        reset()
        InductorSymbolicSizesHook().before_train(SimpleNamespace(cfg=Config(dict(compile=compile))))
        assert_applied(applied)


# Inductor's cold compile of a demo model takes minutes on a 2-core CPU: opt-in, as in test_plans.py.
INDUCTOR = pytest.mark.skipif(os.environ.get('DAT_MM_TEST_INDUCTOR') != '1',
                              reason='inductor code generation: set DAT_MM_TEST_INDUCTOR=1')


@INDUCTOR
@pytest.mark.parametrize('config,entry,dynamic', [(SEGMENTOR, 'tools/train.py', True),
                                                  (DETECTOR, 'tools/train.py', None), (SEGMENTOR, 'mim', None)])
def test_mmengine_compile_trains_the_demo_models(tiny_workspace, tmp_path, config, entry, dynamic):
    command = [ROOT / 'tools/train.py'] if entry == 'tools/train.py' else ['-m', 'mim', 'train', 'dat_mm']
    compile = ['compile=True'] if dynamic is None else [f'compile.dynamic={dynamic}']
    log = run_tool([*command, config, '--work-dir', tmp_path, '--cfg-options', *compile,
                    'train_cfg.max_iters=3', 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=3',
                    'default_hooks.logger.interval=1'], tiny_workspace)
    assert 'Model has been "compiled"' in log and 'EagerOptimizerStepHook' in log
    if dynamic is None:
        assert 'compile: dynamic=None' in log
    else:
        assert 'compile: dynamic=' not in log
    assert 'compile: inductor for symbolic sizes: convolution backward through ATen' in log
    losses = [float(x) for x in re.findall(r'Iter\(train\) \[\d/3\].*? loss: ([-\d.e+na]+)', log)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert torch.load(tmp_path / 'iter_3.pth')['meta']['iter'] == 3


# An inductor backend that counts the graphs holding backbone code, and a hook that records each batch's padded
# size (mmdet's pad_size_divisor, 32) and writes both at the end.
COUNTER = '''
import json

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch._dynamo import register_backend
from torch._inductor.compile_fx import compile_fx

BACKBONE_GRAPHS = []


@register_backend
def inductor_counting_backbone(gm, example_inputs):
    if any('dat_mm/models/backbones/dat.py' in (node.meta.get('stack_trace') or '') for node in gm.graph.nodes):
        BACKBONE_GRAPHS.append(len(gm.graph.nodes))
    return compile_fx(gm, example_inputs)


@HOOKS.register_module()
class RecordSizesHook(Hook):
    def before_train(self, runner):
        self.sizes = set()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        shapes = [image.shape[-2:] for image in data_batch['inputs']]
        self.sizes.add(tuple(-(-max(shape[i] for shape in shapes) // 32) * 32 for i in (0, 1)))

    def after_train(self, runner):
        with open(f'{runner.work_dir}/compiles.json', 'w') as f:
            json.dump(dict(backbone_graphs=len(BACKBONE_GRAPHS), sizes=sorted(self.sizes)), f)
'''


@INDUCTOR
def test_multi_scale_training_compiles_the_backbone_at_most_twice(tiny_workspace, tmp_path):
    """The demo detector under MMEngine's compile with the tools' defaults (torch's shape policy, dynamic=None):
    the first size compiles static, the second with symbolic sizes, and that graph serves every later size."""
    import json
    (tmp_path / 'compile_counter.py').write_text(COUNTER)
    config = tmp_path / 'multi_scale.py'
    config.write_text(
        f"_base_ = '{DETECTOR}'\n"
        "custom_imports = dict(imports=['dat_mm', 'compile_counter'])\n"
        "custom_hooks = [dict(type='RecordSizesHook')]\n"
        "compile = dict(backend='inductor_counting_backbone')\n"
        # The 96 px images at 134 to 333 px, two a batch as mmdet's recipes have: padded sizes of 160 to 352 px,
        # where stage 3's neighborhood attention meets maps of 10 to 22 px (under 7 px they are padded, a branch
        # on the size). On CPU a batch of one would add a guard of torch's own: whether a convolution's input holds
        # more than 20480 elements, which picks oneDNN or the native kernel (docs/design.md#torchcompile).
        "train_dataloader = dict(batch_size=2, dataset=dict(pipeline=[\n"
        "    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True),\n"
        "    dict(type='RandomResize', scale=(128, 128), ratio_range=(1.05, 2.6), keep_ratio=True),\n"
        "    dict(type='PackDetInputs')]))\n")
    log = run_tool([ROOT / 'tools/train.py', config, '--work-dir', tmp_path / 'work', '--cfg-options',
                    'train_cfg.max_iters=8', 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=8',
                    'default_hooks.logger.interval=1', 'randomness.seed=0'], tiny_workspace,
                   PYTHONPATH=str(tmp_path))
    assert 'compile: dynamic=None' in log
    record = json.loads((tmp_path / 'work/compiles.json').read_text())
    assert len(record['sizes']) >= 3, record
    assert 1 <= record['backbone_graphs'] <= 2, (record, log[-3000:])
