"""What dat_mm does with the torch features newer than its floor: used where present, off with one line where not."""
import subprocess
import sys

import pytest
import torch

from commands import tool_env

pytestmark = pytest.mark.compat


def test_the_feature_report_says_what_this_torch_has():
    proc = subprocess.run([sys.executable, '-m', 'dat_mm.compat'], capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f'torch {torch.__version__}'
    from torch.fx.experimental import symbolic_shapes
    has = {'register_fake': hasattr(torch.library, 'register_fake'),
           'add_safe_globals': hasattr(torch.serialization, 'add_safe_globals'),
           'statically_known_true': hasattr(symbolic_shapes, 'has_static_value')}
    for api, present in has.items():
        line, = [line for line in lines if api in line]
        assert line.split()[0] == ('yes' if present else 'no'), proc.stdout


def test_without_register_fake_compiled_code_takes_grid_sample_and_says_so_once(monkeypatch):
    """torch < 2.4 cannot trace the CPU kernels: eager code keeps them, compiled code looks the bias up with
    grid_sample, and one log line says so where the kernels load."""
    from dat_mm.models.layers import deformable_bias
    if not deformable_bias.available():
        pytest.skip('the CPU kernels did not build on this machine')
    logged = []
    monkeypatch.setattr(deformable_bias, 'print_log', lambda message, **kwargs: logged.append(message))
    monkeypatch.setattr(deformable_bias, 'register_fake', None)
    deformable_bias._register_fake_kernels()
    assert len(logged) == 1 and 'cannot trace the deformable-attention CPU kernels' in logged[0]
    assert deformable_bias.available()
    monkeypatch.setattr(deformable_bias, 'is_compiling', lambda: True)
    assert not deformable_bias.available()
