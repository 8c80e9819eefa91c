import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The version and the torch floor, from the one module that holds them (it imports nothing but re).
VERSION = {}
exec((ROOT / 'dat_mm' / 'version.py').read_text(), VERSION)
TORCH_MINIMUM = '.'.join(map(str, VERSION['TORCH_MINIMUM']))
# What `mim search / train / test` read from an installed package: <package>/.mim/{configs,tools,model-index.yml}.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


class BuildWithMimFiles(build_py):
    """Copies the configs, tools and model index into the built package, so that a wheel carries them.

    An editable install gets no copy: tools/link_mim_files.py (run by tools/setup_env.sh) links the
    checkout's own files where mim looks for them instead."""

    def run(self) -> None:
        # pip builds in the checkout's build/, and setuptools only ever adds to it: without this, a module
        # deleted from dat_mm/ would still ship in every wheel built from that checkout.
        shutil.rmtree(Path(self.build_lib) / 'dat_mm', ignore_errors=True)
        super().run()
        target = Path(self.build_lib) / 'dat_mm' / '.mim'
        target.mkdir(parents=True)
        for name in MIM_FILES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            else:
                shutil.copy2(source, target / name)


setup(
    name='dat_mm',
    version=VERSION['__version__'],
    description='Deformable Attention Transformer (DAT, DAT++) backbones for MMDetection and MMSegmentation',
    long_description=(ROOT / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    license_files=['LICENSE'],
    packages=find_packages(include=['dat_mm', 'dat_mm.*']),
    # Declared, so that an editable install puts the checkout itself on sys.path (a .pth line) rather than an
    # import hook behind Python's own path search, where the folder that holds mim's links in site-packages
    # (tools/link_mim_files.py) would be found first, as an empty namespace package.
    package_dir={'': '.'},
    # Compiled on the user's machine, by the set-up or on first use (dat_mm/models/layers/deformable_bias.py).
    package_data={'dat_mm.models.layers': ['*.cpp']},
    # Path.is_relative_to (tools/demo.py); every torch from the floor below runs on 3.9.
    python_requires='>=3.9',
    # The oldest releases that have what the code calls: torch (dat_mm/version.py); mmdet 3.2, the first that
    # runs with mmcv 2.1 (which torch >= 2.1 needs), and with it mmengine 0.7.1; mmseg 1.2.2, whose visualizer
    # takes with_labels (tools/demo_figures.py). mmcv 2.1 (full, with compiled ops; mmdet and mmseg take
    # < 2.2) is not listed: pip would build it in isolation, without torch and without ops. tools/setup_env.sh
    # builds it; docs/installation.md says how.
    install_requires=[f'torch>={TORCH_MINIMUM}', 'mmengine>=0.7.1,<1.0', 'mmdet>=3.2.0,<4.0',
                      'mmsegmentation>=1.2.2,<2.0'],
    extras_require={'timm': ['timm'], 'deploy': ['onnx', 'onnxruntime']},
    cmdclass={'build_py': BuildWithMimFiles},
)
