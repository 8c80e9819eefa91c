import pytest


@pytest.fixture(scope='session')
def tiny_workspace(tmp_path_factory):
    """A folder holding data/tiny, where the demo configs' relative data paths resolve."""
    import sys
    from commands import ROOT
    sys.path.insert(0, str(ROOT / 'tools'))
    from make_tiny_dataset import write_dataset
    root = tmp_path_factory.mktemp('workspace')
    write_dataset(root / 'data' / 'tiny', seed=1, train=6, val=3, size=96)
    return root


@pytest.fixture
def inductor_defaults(monkeypatch):
    """Restores, after the test, the inductor state that dat_mm.runner.inductor_for_symbolic_sizes changes, and
    yields a function that puts torch's defaults back in the middle of a test. ``reset.own_lowering`` and
    ``reset.own_sums`` are torch's own convolution-backward lowering and C++ sum decision, None where this torch
    has none."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor import lowering
    from torch._inductor.codegen import cpp
    from torch._inductor.kernel import conv
    op = torch.ops.aten.convolution_backward.default
    own_lowering = getattr(conv, 'convolution_backward_lowering', None)
    own_sums = getattr(cpp.CppKernel, 'need_use_acc_helper', None)
    own_sums = getattr(own_sums, '__wrapped__', own_sums)   # torch's, even where an earlier test replaced it
    monkeypatch.setitem(lowering.lowerings, op, lowering.lowerings[op])
    if own_sums is not None:
        monkeypatch.setattr(cpp.CppKernel, 'need_use_acc_helper', own_sums)

    def reset():
        inductor_config.layout_optimization, inductor_config.cpp.simdlen = True, None
        if own_lowering is not None:
            lowering.lowerings[op] = own_lowering
        if own_sums is not None:
            cpp.CppKernel.need_use_acc_helper = own_sums

    reset.own_lowering, reset.own_sums = own_lowering, own_sums
    with inductor_config.patch({'layout_optimization': inductor_config.layout_optimization,
                                'cpp.simdlen': inductor_config.cpp.simdlen}):
        yield reset
