from setuptools import find_packages, setup

setup(
    name='dat_mm',
    version='0.1.0',
    description='Deformable Attention Transformer (DAT, DAT++) backbones for MMDetection and MMSegmentation',
    packages=find_packages(include=['dat_mm', 'dat_mm.*']),
    python_requires='>=3.8',
    # mmcv (full, with compiled ops) is built from source by tools/setup_env.sh; pip cannot do that unaided.
    install_requires=['torch>=2.0', 'mmengine>=0.10.0,<1.0', 'mmdet>=3.0,<4.0', 'mmsegmentation>=1.0,<2.0'],
    extras_require={'timm': ['timm']},
)
