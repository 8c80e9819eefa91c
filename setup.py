import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
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
    version='0.1.0',
    description='Deformable Attention Transformer (DAT, DAT++) backbones for MMDetection and MMSegmentation',
    packages=find_packages(include=['dat_mm', 'dat_mm.*']),
    # Declared, so that an editable install puts the checkout itself on sys.path (a .pth line) rather than an
    # import hook behind Python's own path search, where the folder that holds mim's links in site-packages
    # (tools/link_mim_files.py) would be found first, as an empty namespace package.
    package_dir={'': '.'},
    # Compiled on the user's machine, by the set-up or on first use (dat_mm/models/layers/deformable_bias.py).
    package_data={'dat_mm.models.layers': ['*.cpp']},
    python_requires='>=3.8',
    # mmcv (full, with compiled ops) is built from source by tools/setup_env.sh; pip cannot do that unaided.
    install_requires=['torch>=2.0', 'mmengine>=0.10.0,<1.0', 'mmdet>=3.0,<4.0', 'mmsegmentation>=1.0,<2.0'],
    extras_require={'timm': ['timm'], 'deploy': ['onnx', 'onnxruntime']},
    cmdclass={'build_py': BuildWithMimFiles},
)
