"""What the tools share: one config loader for mmdet and mmseg configs, distributed runs on machines
without CUDA, a runner that MMEngine's ``compile`` can trace, and building a config's model outside a Runner
(FLOPs, export)."""
import argparse
import copy
import glob
import os
import os.path as osp
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('config', help='an mmdet or mmseg config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help="override config entries, e.g. model.backbone.init_cfg.checkpoint=dat.pth")
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (tools/dist_*.sh use pytorch, i.e. torchrun)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def config_scope(cfg: Config) -> str:
    """'mmdet' or 'mmseg', the config's ``default_scope``; anything else stops the tool with a clear error."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise SystemExit(f"{cfg.filename}: default_scope is {scope!r}; expected an mmdet or mmseg config")
    return scope


def load_config(args: argparse.Namespace) -> Config:
    """The config with command-line overrides, launcher and work dir applied; the library registered."""
    if not osp.isfile(args.config):
        raise SystemExit(f'Config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    scope = config_scope(cfg)
    # Registers every mmdet / mmseg module so that Runner.from_cfg finds datasets, metrics and hooks.
    __import__(f'{scope}.utils', fromlist=['register_all_modules']).register_all_modules(init_default_scope=False)
    import dat_mm  # noqa: F401  (backbone registry and safe checkpoint loading, whatever the config imports)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def _uses_sync_bn(node) -> bool:
    if isinstance(node, dict):
        return node.get('type') in ('SyncBN', 'MMSyncBN') or any(_uses_sync_bn(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_uses_sync_bn(v) for v in node)
    return False


def init_cpu_distributed(cfg: Config) -> None:
    """Prepares a torchrun job on a machine without CUDA, where MMEngine's pytorch launcher cannot run
    (it calls ``torch.cuda.set_device``).

    Starts the gloo process group from torchrun's environment before the Runner exists, so the Runner
    finds it initialised and skips its own launcher, and has MMEngine's DDP wrapper built without device
    ids, as DDP requires for CPU modules. Nothing to do with CUDA or without a launcher.
    """
    if cfg.launcher != 'pytorch' or torch.cuda.is_available():
        return
    if _uses_sync_bn(cfg.model) or cfg.get('sync_bn'):
        raise SystemExit('This config uses SyncBN, which torch runs on GPUs only. Train it on GPUs, or on CPU '
                         'in one process (SyncBN then acts as BN), or replace SyncBN by BN in the config.')
    if not dist.is_initialized():
        dist.init_process_group('gloo', rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
    if dist.get_rank() == 0:
        print(f'No CUDA: training on CPU in {dist.get_world_size()} processes over gloo', flush=True)
    cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict()).backend = 'gloo'   # as logged
    wrapper = ConfigDict(cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False)))
    wrapper.device_ids = None
    cfg.model_wrapper_cfg = wrapper


@HOOKS.register_module()
class EagerOptimizerStepHook(Hook):
    """Runs the optimizers' step outside torch.compile, which MMEngine's ``compile`` applies to the whole
    ``train_step``, optimizer step included.

    Traced, the step stops Dynamo (torch 2.13) on param groups that are ConfigDicts, which MMEngine builds from
    every ``paramwise_cfg`` ("'UserDefinedDictVariable' object has no attribute 'items'"). Traced or not, the
    learning rate is a Python float that the schedulers change at every iteration, and each new value would
    compile the step again. Forward and backward stay compiled.
    """

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        for each in (wrapper.values() if hasattr(wrapper, 'values') else [wrapper]):
            each.optimizer.step = torch.compiler.disable(each.optimizer.step)


@HOOKS.register_module()
class InductorSymbolicSizesHook(Hook):
    """:func:`inductor_for_symbolic_sizes` before the first (compiled) step where the config compiles and its
    ``compile.dynamic`` is not False, for mmdet's and mmseg's own train tools; ``tools/train.py`` and
    ``mim train dat_mm`` apply it themselves."""

    def before_train(self, runner) -> None:
        if _sizes_may_turn_symbolic(runner.cfg.get('compile')):
            inductor_for_symbolic_sizes(verbose=is_main_process())


def _sizes_may_turn_symbolic(compile_cfg) -> bool:
    """For MMEngine's ``compile`` option: it compiles, and ``dynamic`` is not False (torch's default None included)."""
    return bool(compile_cfg) and (not isinstance(compile_cfg, dict) or compile_cfg.get('dynamic') is not False)


def prepare_compile(cfg: Config) -> None:
    """For a config that compiles (``compile=True`` or a dict): ``EagerOptimizerStepHook`` added once, torch's
    shape policy (``dynamic=None``) unless the config chooses, and where sizes may turn symbolic (``dynamic`` not
    False), the inductor settings they need (:func:`inductor_for_symbolic_sizes`). See docs/design.md#torchcompile."""
    if not cfg.get('compile'):
        return
    hooks = cfg.get('custom_hooks') or []
    if not any(hook.get('type') == 'EagerOptimizerStepHook' for hook in hooks):
        cfg.custom_hooks = [*hooks, dict(type='EagerOptimizerStepHook')]
    options = ConfigDict(cfg.compile) if isinstance(cfg.compile, dict) else ConfigDict()
    main_rank = is_main_process()
    if 'dynamic' not in options:
        # Written out, so that the log says it: the first input size compiles static, and the first change of size
        # compiles once more with symbolic sizes, which then serve every size (multi-scale training).
        options.dynamic = None
        if main_rank:
            print('compile: dynamic=None (torch\'s default: the first size static, then symbolic sizes); '
                  'set compile.dynamic to choose', flush=True)
    if _sizes_may_turn_symbolic(options):
        inductor_for_symbolic_sizes(main_rank)
    cfg.compile = options   # a copy is stored: assigned once complete


def inductor_for_symbolic_sizes(verbose: bool = True) -> None:
    """Inductor settings that symbolic sizes need (torch 2.13), each left alone where the user has chosen it:

    - the convolutions' backward through ATen's kernel: inductor's own lowering of it fixes the input gradient's
      strides to the first size's numbers where layout optimization is off (as it is for symbolic sizes), and every
      new size then compiles again. Outside max-autotune that lowering picks ATen's kernel anyway.
    - on CPU, layout optimization off: it lays convolutions out channels last, and that decision fails on symbolic
      sizes ("cannot determine truth value of Relational"); other devices turn it off by themselves.
    - on CPU, vectorization off: choosing the vector tiling of gathers on symbolic sizes is most of the compile (a
      neighborhood attention layer's training step: 823 s with it, 226 s without, both under cProfile).
    - on CPU, float sums of a symbolic number of elements always in inductor's chunks: its C++ code sums in chunks
      only above 4096 elements, and deciding that guards on the size (the stage-1 maps of a batch of two reach
      it at about 180x180 px), so multi-scale sizes on either side compiled twice.
    """
    import torch._inductor.config as inductor_config
    changed = []
    if _conv_backward_through_aten():
        changed.append('convolution backward through ATen')
    if not torch.cuda.is_available():
        if inductor_config.layout_optimization:
            inductor_config.layout_optimization = False
            changed.append('layout optimization off')
        if inductor_config.cpp.simdlen is None:
            inductor_config.cpp.simdlen = 1   # a width in bits that no vector ISA has: scalar C++ kernels
            changed.append('C++ vectorization off')
        if _sums_in_chunks_on_symbolic_sizes():
            changed.append('chunked sums on symbolic sizes')
    if changed and verbose:
        print(f'compile: inductor for symbolic sizes: {", ".join(changed)} (docs/design.md#torchcompile)', flush=True)


def _conv_backward_through_aten() -> bool:
    """Replaces inductor's own lowering of aten.convolution_backward (torch 2.13, kernel/conv.py) by a call of
    the ATen operator. False where this torch has no such lowering or it was replaced already."""
    try:
        from torch._inductor import lowering
        from torch._inductor.kernel import conv
    except ImportError:
        return False
    op = torch.ops.aten.convolution_backward.default
    own = getattr(conv, 'convolution_backward_lowering', None)
    if own is None or lowering.lowerings.get(op) is not own:
        return False
    lowering.lowerings[op] = lowering.fallback_handler(op, add_to_fallback_set=False)
    return True


# The most elements inductor's C++ reductions sum in one run (torch 2.13, codegen/cpp.py); above it they sum in
# chunks of it, for precision.
CPP_SUM_CHUNK = 4096


def _sums_in_chunks_on_symbolic_sizes() -> bool:
    """Has inductor's C++ code decide chunked float sums without a guard: chunked unless the size is known to be
    at most CPP_SUM_CHUNK (the decision itself is unchanged for static sizes). False where this torch has no such
    decision or it was replaced already."""
    try:
        from torch._inductor.codegen import cpp
        from torch._inductor.utils import sympy_product
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    own = getattr(cpp.CppKernel, 'need_use_acc_helper', None)
    if own is None or getattr(own, 'without_size_guard', False):
        return False

    def need_use_acc_helper(self, reduction_type, dtype, *args, **kwargs):
        if reduction_type == 'sum' and dtype == torch.float and self.call_ranges is not None:
            size = sympy_product(self.call_ranges[self.reduction_depth:])
            return not V.graph.sizevars.statically_known_leq(size, CPP_SUM_CHUNK)
        return own(self, reduction_type, dtype, *args, **kwargs)

    need_use_acc_helper.without_size_guard = True
    need_use_acc_helper.__wrapped__ = own
    cpp.CppKernel.need_use_acc_helper = need_use_acc_helper
    return True


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    init_cpu_distributed(cfg)
    prepare_compile(cfg)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def _recorded_checkpoint(work_dir: str) -> Optional[str]:
    """The path MMEngine wrote into ``work_dir/last_checkpoint``, if it wrote one."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        return None
    with open(marker) as f:
        return f.read().strip()


def last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint MMEngine recorded as the latest in ``work_dir``, if any."""
    path = _recorded_checkpoint(work_dir)
    return path if path and osp.isfile(path) else None


def resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest checkpoint in ``work_dir`` that loads: the one MMEngine recorded last, else the others
    from the newest. A node that crashed while saving leaves a truncated file, which ``last_checkpoint``
    may already name; each one passed over is named in a warning. None where the work dir holds no
    checkpoint; a SystemExit that lists them where none loads, so that a run never starts over unnoticed.
    Checkpoints load under torch's weights_only default (``dat_mm`` allow-lists what MMEngine writes)."""
    candidates = sorted(glob.glob(osp.join(work_dir, '*.pth')), key=osp.getmtime, reverse=True)
    recorded = _recorded_checkpoint(work_dir)
    if recorded and osp.isfile(recorded):
        candidates = [recorded] + [path for path in candidates if not osp.samefile(path, recorded)]
    elif recorded:
        print(f'--resume: warning: {work_dir}/last_checkpoint names {recorded}, which does not exist', flush=True)
    broken = []
    for path in candidates:
        try:
            # mmap: reads the archive's index and pickled structure, not every tensor.
            torch.load(path, map_location='cpu', mmap=True)
        except Exception as err:
            reason = f'{type(err).__name__}: {str(err).splitlines()[0][:200]}'
            broken.append(f'{path} ({reason})')
            print(f'--resume: warning: {path} does not load, skipping it ({reason})', flush=True)
            continue
        if broken:
            print(f'--resume: resuming from {path}, the newest checkpoint that loads', flush=True)
        return path
    if broken:
        raise SystemExit(f'--resume: no checkpoint in {work_dir} loads:\n  ' + '\n  '.join(broken) +
                         '\nRemove them to start from scratch, or pass --resume CHECKPOINT.')
    return None


def skip_backbone_init(cfg: Config) -> None:
    """Drops the backbone's ImageNet ``init_cfg``: a checkpoint loaded afterwards holds the backbone."""
    if cfg.model.get('backbone', {}).get('init_cfg'):
        cfg.model.backbone.init_cfg = None


def build_model(cfg: Config) -> torch.nn.Module:
    """The config's detector or segmentor on CPU in eval mode, SyncBN replaced by BN, without ImageNet
    weights (load a checkpoint afterwards)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    import dat_mm  # noqa: F401  (registers the backbone)
    scope = config_scope(cfg)
    cfg = copy.deepcopy(cfg)
    skip_backbone_init(cfg)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return revert_sync_batchnorm(registry.build(cfg.model)).eval()
