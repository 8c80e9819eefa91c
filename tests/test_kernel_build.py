"""Building the deformable attention's CPU kernels on a machine that has no build (an empty
TORCH_EXTENSIONS_DIR): a build killed halfway must not leave later runs hanging, and the ranks of a job that
start together build once. Each test compiles the kernels (30-60 s here)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from commands import ROOT, free_port, tool_env

# A DAT++ deformable layer on CPU under the cpu plan, which reads its bias through the kernels.
RUN = '''
import torch
from dat_mm.models.layers import DeformableAttention, deformable_bias
layer = DeformableAttention(32, 2, 1, stride=2, offset_kernel=3, offset_range_factor=-1, table_size=(7, 7), version=2)
out, _, _ = layer(torch.randn(1, 32, 12, 16))
print('kernels', deformable_bias.available(), 'output', tuple(out.shape), flush=True)
'''


def _env(extensions) -> dict:
    return tool_env(TORCH_EXTENSIONS_DIR=str(extensions), DAT_MM_ATTENTION_PLAN='cpu')


@pytest.mark.compat
def test_a_run_killed_while_building_leaves_the_next_run_to_build_and_finish(tmp_path):
    script = tmp_path / 'run.py'
    script.write_text(RUN)
    extensions = tmp_path / 'extensions'
    # Its own session, so that the kill takes the compiler with it, as the OOM killer or a preemption would.
    first = subprocess.Popen([sys.executable, script], env=_env(extensions), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if 'compiling the deformable-attention CPU kernels' in line:
            break
    time.sleep(5)   # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    first.stdout.close()
    assert first.returncode == -signal.SIGKILL, ''.join(seen)
    assert not list(extensions.rglob('*.so')), 'the build had finished before the kill'
    assert list(extensions.glob('*.lock')) and list(extensions.glob('*.build-*')), 'what a killed build leaves'

    start = time.monotonic()
    second = subprocess.run([sys.executable, script], env=_env(extensions), capture_output=True, text=True,
                            timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert 'kernels True output (1, 32, 12, 16)' in out
    assert 'compiling the deformable-attention CPU kernels' in out and 'waiting' not in out
    assert not list(extensions.glob('*.build-*')), 'the killed build was cleared'
    assert time.monotonic() - start < 240


def test_ranks_that_start_together_build_once_and_all_run(tmp_path):
    script = tmp_path / 'run.py'
    script.write_text('import sys\nsys.argv = sys.argv[:1]\n' + RUN)   # torchrun.sh appends --launcher pytorch
    env = _env(tmp_path / 'extensions')
    env.update(PYTHON=sys.executable, PORT=str(free_port()))
    proc = subprocess.run(['bash', ROOT / 'tools/torchrun.sh', '2', script], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count('kernels True output (1, 32, 12, 16)') == 2, out[-3000:]
    assert out.count('compiling the deformable-attention CPU kernels') == 1, out[-3000:]
    assert out.count('another process is building the deformable-attention CPU kernels; waiting') == 1, out[-3000:]
