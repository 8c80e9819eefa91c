"""Links the checkout's configs, tools and model index where mim reads an installed package's files, for an
editable install of dat_mm (what tools/setup_env.sh makes).

mim looks for them in ``<distribution location>/dat_mm/.mim``, which for an editable install is
site-packages, where no copy of the package lives. Links there (never copies) keep every edit to
``configs/`` visible to ``mim search / train / test / run`` without reinstalling. They are entered in the
installation's RECORD, so that pip removes them with the install: a wheel installed later into the same
environment then never writes through them into the checkout.

    python tools/link_mim_files.py        # run by tools/setup_env.sh after `pip install -e .`
"""
import json
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What mim reads; setup.py copies the same three into a built wheel.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


def main() -> int:
    dist = metadata.distribution('dat_mm')
    direct_url = json.loads(dist.read_text('direct_url.json') or '{}')
    if not direct_url.get('dir_info', {}).get('editable'):
        print(f'dat_mm is installed from a wheel at {dist.locate_file("")}, which carries its own mim files')
        return 0
    site = Path(dist.locate_file(''))
    target = site / 'dat_mm' / '.mim'
    target.mkdir(parents=True, exist_ok=True)
    for name in MIM_FILES:
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / name, target_is_directory=(ROOT / name).is_dir())
    # The installer's list of what to remove on uninstall.
    record = next(Path(f.locate()) for f in dist.files if f.name == 'RECORD' and f.parent.name.endswith('.dist-info'))
    listed = set(record.read_text().splitlines())
    entries = [f'dat_mm/.mim/{name},,' for name in MIM_FILES]
    with record.open('a') as f:
        f.writelines(entry + '\n' for entry in entries if entry not in listed)
    print(f'mim reads this checkout through {target}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
