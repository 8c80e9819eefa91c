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
