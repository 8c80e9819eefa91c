"""The package as OpenMMLab users meet it: a wheel that carries configs, tools and the model index in
``dat_mm/.mim``, found by ``mim search`` and run by ``mim train`` / ``mim test`` from outside the repository."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from commands import ROOT, run_tool, tool_env

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for folder in ('det', 'seg')
                 for p in (ROOT / 'configs' / folder).glob('*.py'))


def index_models(root: Path) -> list:
    """Every model entry of ``root/model-index.yml``, through the metafiles it imports."""
    index = yaml.safe_load((root / 'model-index.yml').read_text())
    models = []
    for metafile in index['Import']:
        models += yaml.safe_load((root / metafile).read_text())['Models']
    return models


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    """A directory outside the repository with the wheel of this checkout installed into it (no deps)."""
    tmp = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                    '-w', str(tmp / 'dist'), str(ROOT)], check=True, cwd=tmp, env=tool_env())
    wheel, = (tmp / 'dist').glob('dat_mm-*.whl')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(tmp / 'site'),
                    str(wheel)], check=True, cwd=tmp, env=tool_env())
    return tmp / 'site'


@pytest.fixture(scope='module')
def wheel(site) -> Path:
    wheel, = (site.parent / 'dist').glob('dat_mm-*.whl')
    return wheel


@pytest.mark.compat
def test_import_stops_on_an_older_torch_naming_the_version_it_needs():
    """torch 2.0 lacks scaled_dot_product_attention's scale argument: importing there must say what to install,
    not fail inside the first forward pass."""
    code = "import torch\ntorch.__version__ = '2.0.1+cu118'\nimport dat_mm\n"
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=tool_env())
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: dat_mm needs torch >= 2.1') and 'torch 2.0.1+cu118' in last, proc.stderr


def test_the_wheel_declares_the_floors_the_code_checks_a_license_and_the_readme(wheel):
    from dat_mm.version import TORCH_MINIMUM, check_torch
    check_torch('2.1.0')
    check_torch('2.13.0+cpu')
    with pytest.raises(ImportError, match='needs torch >= 2.1'):
        check_torch('2.0.1')
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read('dat_mm-0.1.0.dist-info/METADATA').decode()
    requires = re.findall(r'^Requires-Dist: (.+)$', metadata, re.M)
    assert f"torch>={'.'.join(map(str, TORCH_MINIMUM))}" in requires
    names = {re.match(r'[\w.-]+', r).group(0): r for r in requires if 'extra ==' not in r}
    assert set(names) == {'torch', 'mmengine', 'mmdet', 'mmsegmentation'}, requires
    assert '>=3.2.0' in names['mmdet'] and '>=1.2.2' in names['mmsegmentation'] and '>=0.7.1' in names['mmengine']
    assert 'Requires-Python: >=3.9' in metadata and 'License: Apache-2.0' in metadata
    assert (ROOT / 'README.md').read_text().splitlines()[0] in metadata   # long_description
    assert any(name.endswith('LICENSE') for name in archive.namelist())


def test_a_module_deleted_from_the_source_leaves_the_wheel(tmp_path):
    stale = ROOT / 'build' / 'lib' / 'dat_mm' / 'deleted_module.py'   # as an earlier build would leave it
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('')
    try:
        subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                        '-w', str(tmp_path), str(ROOT)], check=True, cwd=tmp_path, env=tool_env())
    finally:
        stale.unlink(missing_ok=True)
    wheel, = tmp_path.glob('dat_mm-*.whl')
    shipped = {n for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith('dat_mm/') and n.endswith('.py') and '/.mim/' not in n}
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / 'dat_mm').rglob('*.py')}


def run_mim(args, cwd: Path, site: Path) -> str:
    """``mim ARGS`` with the installed wheel ahead of the editable checkout on the path."""
    return run_tool(['-m', 'mim', *args], cwd, PYTHONPATH=str(site))


def test_every_config_has_one_model_index_entry():
    models = index_models(ROOT)
    configs = [m['Config'] for m in models]
    assert sorted(configs) == CONFIGS, 'configs without an entry, or entries without a config'
    names = [m['Name'] for m in models]
    assert len(set(names)) == len(names)
    for model in models:
        assert model['Name'] == Path(model['Config']).stem
        meta = model['Metadata']
        assert {'Parameters', 'FLOPs', 'Training Data', 'Batch Size'} <= set(meta), model['Name']
        assert ('Epochs' in meta) != ('Iterations' in meta), model['Name']
        # Results are what this code trained, with the weights it links: none yet. The papers' numbers live in
        # Metadata fields named 'Paper ...', so that neither mim nor a reader takes them for results of this code.
        assert not model.get('Results') or model.get('Weights'), f"{model['Name']}: Results without weights"
        paper = {key: value for key, value in meta.items() if 'paper' in key.lower()}
        assert all(key.startswith('Paper ') and isinstance(value, (int, float)) for key, value in paper.items()), paper


def _readme_zoo() -> dict:
    """config file name -> (params M, GFLOPs) of the README's model-zoo tables, which hold get_flops.py's figures."""
    rows = re.findall(r'^\| `(\S+\.py)` \| ([\d.]+)M \| (\d+) \|', (ROOT / 'README.md').read_text(), re.M)
    return {name: (float(params), int(gflops)) for name, params, gflops in rows}


def test_model_index_parameters_and_flops_match_get_flops_table():
    zoo = _readme_zoo()
    assert len(zoo) == len(CONFIGS)
    for model in index_models(ROOT):
        params, gflops = zoo[Path(model['Config']).name]
        assert round(model['Metadata']['Parameters'] / 1e6, 1) == params, model['Name']
        assert round(model['Metadata']['FLOPs'] / 1e9) == gflops, model['Name']


def test_wheel_carries_model_index_configs_and_tools(site, wheel):
    mim = site / 'dat_mm' / '.mim'
    models = index_models(mim)
    assert sorted(m['Config'] for m in models) == CONFIGS
    for model in models:
        assert (mim / model['Config']).is_file(), model['Config']
    for shared in ('configs/_base_/dat.py', 'configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py',
                   'tools/train.py', 'tools/test.py', 'tools/make_tiny_dataset.py', 'tools/export_onnx.py'):
        assert (mim / shared).is_file(), shared
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if '__pycache__' in name]
    assert all(name.startswith(('dat_mm/', 'dat_mm-0.1.0.dist-info/')) for name in names), 'nothing else installed'
    assert 'dat_mm/.mim/model-index.yml' in names
    assert 'dat_mm/models/layers/deformable_bias.cpp' in names, 'the CPU kernels are compiled from the wheel'


def test_mim_search_lists_every_model(site, tmp_path):
    out = run_mim(['search', 'dat_mm', '--field', 'config'], tmp_path, site)
    listed = set(re.findall(r'configs/(?:det|seg)/[\w.+-]+\.py', out))
    assert listed == set(CONFIGS), sorted(set(CONFIGS) ^ listed)


@pytest.mark.compat
def test_mim_train_and_test_by_config_name_from_the_wheel(site, tmp_path):
    mim = site / 'dat_mm' / '.mim'
    run_tool([mim / 'tools' / 'make_tiny_dataset.py', 'data/tiny', '--train', '4', '--val', '2'], tmp_path)
    config = 'upernet_dat-mini_tiny-ade.py'
    out = run_mim(['train', 'dat_mm', config, '--work-dir', 'work', '--cfg-options', 'train_cfg.max_iters=2',
                   'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2'], tmp_path, site)
    assert str(mim / 'configs' / 'seg' / 'demo' / config) in out, 'the config should come from the wheel'
    checkpoint = tmp_path / 'work' / 'iter_2.pth'
    assert checkpoint.is_file(), out[-2000:]
    out = run_mim(['test', 'dat_mm', config, '--checkpoint', str(checkpoint), '--work-dir', 'work'], tmp_path, site)
    assert re.search(r"'mIoU': \d", out), out[-2000:]


def test_mim_reads_the_checkout_itself_in_the_editable_environment(tmp_path):
    """The README's set-up installs this checkout in editable mode; from any directory, mim finds its models,
    runs its tools and trains its configs by name, from the checkout's own files (edits seen, nothing copied)."""
    out = run_tool(['-m', 'mim', 'search', 'dat_mm', '--field', 'config'], tmp_path)
    assert set(re.findall(r'configs/(?:det|seg)/[\w.+-]+\.py', out)) == set(CONFIGS)
    run_tool(['-m', 'mim', 'run', 'dat_mm', 'make_tiny_dataset', 'data/tiny', '--train', '4', '--val', '2'], tmp_path)
    config = 'mask-rcnn_dat-mini_fpn_tiny-coco.py'
    out = run_tool(['-m', 'mim', 'train', 'dat_mm', config, '--work-dir', 'work', '--cfg-options',
                    'train_cfg.max_iters=2', 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2'],
                   tmp_path)
    assert str(ROOT / 'configs' / 'det' / 'demo' / config) in out, 'the config should come from the checkout'
    assert (tmp_path / 'work' / 'iter_2.pth').is_file(), out[-2000:]
