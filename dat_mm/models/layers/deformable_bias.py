"""The deformable attention's CPU bias kernels (``deformable_bias.cpp``) as the operators
``torch.ops.dat_mm.deformable_*``: built once per machine, then loaded.

``tools/setup_env.sh`` builds them, so that no training run compiles; a run that finds no build (an install
that skipped the set-up) builds it first, announced by a log line. Builds survive being killed at any moment
(the OOM killer, a scheduler's preemption, Ctrl-C) and several processes starting together (the ranks of a
job on a fresh machine):

- a builder holds an ``flock`` on ``<name>.lock`` beside the build, which the OS releases when its holder
  dies, so no lock outlives its process;
- each build runs in a folder of its own, and the library reaches its final path by an atomic rename,
  whole or not at all;
- a process that finds another building waits at most ``BUILD_WAIT_SECONDS``, naming the lock.

Build them by hand with ``python -c "import dat_mm.models.layers.deformable_bias as k; k.main()"``.
"""
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from mmengine.logging import print_log

from ...compat import is_compiling, register_fake

SOURCE = Path(__file__).with_name('deformable_bias.cpp')
CFLAGS = ['-O3', '-march=native', '-fno-trapping-math', '-fopenmp']
BUILD_WAIT_SECONDS = 600


def _cpu_flags() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line for line in f if line.startswith('flags')), '')
    except OSError:
        return platform.processor()


def library_path() -> Path:
    """This machine's build: named after the source, the compiler flags, torch, Python and the CPU's
    features (-march=native), so that a home folder shared by several machines or environments never hands
    one of them another's library."""
    key = hashlib.sha1()
    for part in (SOURCE.read_bytes(), ' '.join(CFLAGS), torch.__version__, sys.version, _cpu_flags()):
        key.update(part if isinstance(part, bytes) else part.encode())
    name = f'dat_mm_deformable_bias_{key.hexdigest()[:12]}'
    # torch's own default, found without importing torch.utils.cpp_extension: a CUDA build of torch on a machine
    # without a GPU prints a line about CUDA_HOME at that import, which every run that only loads would repeat.
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    root = Path(os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(cache, 'torch_extensions'))
    return root / name / f'{name}.so'


def _lock(lock, lock_path: Path) -> None:
    import fcntl
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    print_log(f'dat_mm: another process is building the deformable-attention CPU kernels; waiting for it '
              f'(lock {lock_path}, at most {BUILD_WAIT_SECONDS} s)', logger='current')
    deadline = time.monotonic() + BUILD_WAIT_SECONDS
    while True:
        time.sleep(0.5)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f'the process holding {lock_path} did not finish building them within '
                                   f'{BUILD_WAIT_SECONDS} s') from None


def _build_and_load(path: Path) -> None:
    """Builds the library into ``path`` unless another process does so first, and loads it."""
    from torch.utils import cpp_extension
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent.with_suffix('.lock')
    with open(lock_path, 'a') as lock:   # closing it releases the lock
        _lock(lock, lock_path)
        if path.is_file():   # built by the process this one waited for
            torch.ops.load_library(str(path))
            return
        # Folders of builds that were killed: nobody else builds while this process holds the lock.
        for stale in path.parent.parent.glob(f'{path.stem}.build-*'):
            shutil.rmtree(stale, ignore_errors=True)
        work = path.parent.parent / f'{path.stem}.build-{os.getpid()}'
        work.mkdir()
        print_log(f'dat_mm: compiling the deformable-attention CPU kernels into {path.parent} (once per machine, '
                  'about a minute)', logger='current')
        start = time.monotonic()
        # Also loads it. Where the library lands is read from the folder: torch 2.1 returns None here.
        cpp_extension.load(path.stem, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=['-fopenmp'],
                           build_directory=str(work), is_python_module=False)
        path.parent.mkdir(exist_ok=True)
        os.replace(work / path.name, path)
        shutil.rmtree(work, ignore_errors=True)
        print_log(f'dat_mm: built the deformable-attention CPU kernels in {time.monotonic() - start:.0f} s',
                  logger='current')


def _register_fake_kernels() -> None:
    """Output shapes for torch.compile's tracing, which runs no kernel."""
    if register_fake is None:
        print_log(f'dat_mm: torch {torch.__version__} cannot trace the deformable-attention CPU kernels '
                  '(torch.library.register_fake, torch >= 2.4): compiled code looks the bias up with grid_sample, '
                  'eager code with the kernels', logger='current')
        return

    @register_fake('dat_mm::deformable_bias_out')
    def _bias_out(table, qx, qy, kx, ky, out):
        return None

    @register_fake('dat_mm::deformable_biased_softmax_backward_')
    def _biased_softmax_backward(table, qx, qy, kx, ky, scale, scores, delta, grad):
        return table.new_empty(table.shape), kx.new_empty(kx.shape[0], 2, kx.shape[1])


def _load() -> bool:
    try:
        path = library_path()
        if path.is_file():
            torch.ops.load_library(str(path))
        else:
            _build_and_load(path)
    # What a machine without the means to build or load them raises: no compiler or ninja, a failed compile
    # (RuntimeError from torch's build), a library that does not load or a build that never ended (OSError,
    # TimeoutError). Anything else is a bug, and shows as one.
    except (OSError, RuntimeError) as err:
        warnings.warn(f'dat_mm: the deformable-attention CPU kernels could not be built, so the position bias '
                      f'falls back to grid_sample (the same numbers; DAT-T++ trains about 1.45x slower on CPU): {err}')
        return False
    _register_fake_kernels()
    return True


_available: Optional[bool] = None


@torch.compiler.assume_constant_result
def _loaded() -> bool:
    """Loads the operators on the first call, building them first where this machine has none. Dynamo runs it as
    plain Python while it traces and takes its result as a constant: a training run whose first step is compiled
    (MMEngine's compile=True) loads them there, and the graph calls them. Read as a traced global, an unloaded
    state put grid_sample in that graph (a DAT-T++ training step 2.7x slower on CPU), and the first eager call
    compiled it again."""
    global _available
    if _available is None:
        _available = _load()
    return _available


def available() -> bool:
    """Whether the operators can be called; compiled code calls them only where this torch can trace them."""
    if is_compiling() and register_fake is None:
        return False
    return _loaded()


def main() -> None:
    """Loads the kernels, building them where this machine has none, and says where they are; exits 1 where
    they cannot be built (tools/setup_env.sh)."""
    ok = available()
    print(f'dat_mm: deformable-attention CPU kernels {"in" if ok else "not built; see the warning above;"} '
          f'{library_path()}', flush=True)
    sys.exit(0 if ok else 1)
