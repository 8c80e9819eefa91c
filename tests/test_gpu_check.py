"""tools/analysis/gpu_check.sh on a machine without CUDA: a dry run that names what the GPU run would do, and
whose commands are valid here (the benchmark's own dry run takes the same options)."""
import re
import subprocess

import pytest
import torch

from commands import ROOT, run_tool, tool_env


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present: the script would measure')
def test_gpu_check_is_a_dry_run_without_cuda_and_its_benchmark_options_parse():
    proc = subprocess.run(['bash', ROOT / 'tools/analysis/gpu_check.sh'], capture_output=True, text=True,
                          env=tool_env(OUT='/nonexistent/out'))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert 'dry run' in out and 'sees no CUDA device' in out
    assert re.search(r'pytest -p no:cacheprovider -q -rs -s tests/test_cuda\.py', out)
    runs = [line.split('benchmark.py', 1)[1].split() for line in out.splitlines() if 'benchmark.py' in line]
    assert len(runs) == 2 and all('--batch' in r and '--plans' in r for r in runs)
    # The same options through the benchmark's own CUDA dry run: every model in both plans, batch 2.
    listed = run_tool([ROOT / 'tools/analysis/benchmark.py', '--device', 'cuda', '--sizes', '1344x800', '--batch',
                       '2', '--models', 'DAT-T++ fast', 'DAT-T (1,1,2,1) fast', 'Swin-T', '--plans', 'device', 'cpu',
                       '--modes', 'fwd+bwd', '--dtypes', 'fp16'], ROOT)
    rows = re.findall(r'1344x800 fwd\+bwd fp16 (.+)', listed)
    assert sorted(rows) == sorted(['DAT-T++ fast', 'DAT-T++ fast (cpu plan)', 'DAT-T (1,1,2,1) fast',
                                   'DAT-T (1,1,2,1) fast (cpu plan)', 'Swin-T']), rows


def test_cuda_tests_are_skipped_here_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: tests/test_cuda.py runs')
    proc = subprocess.run([__import__('sys').executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', '-rs',
                           'tests/test_cuda.py'], cwd=ROOT, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert re.search(r'(\d+) skipped', proc.stdout) and 'needs a CUDA device' in proc.stdout
    assert ' passed' not in proc.stdout and ' failed' not in proc.stdout
