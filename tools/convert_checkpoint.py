"""Converts the authors' DAT checkpoints into files this project loads.

- ImageNet checkpoints (weights under 'model') become backbone weights for
  ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``.
- The authors' mmdet 2 / mmseg 0 detectors and segmentors (keys 'backbone.*', 'neck.*', ...; mmcv 1 meta)
  become whole-model weights for ``load_from=OUT`` (or ``tools/test.py CONFIG OUT``).

Every backbone key is checked against the arch, and with --config every other key against the model the
config builds; anything unknown, missing or mis-shaped stops the conversion with the keys named. Files are
read as tensors and plain data (``dat_mm.checkpoint.read_checkpoint``): the authors' yacs configs come back as
dicts, and a file that holds any other object is refused before any of it runs.

    python tools/convert_checkpoint.py dat_pp_tiny_in1k_224.pth checkpoints/dat_pp_tiny_in1k_224.pth --arch tiny++
    python tools/convert_checkpoint.py authors_mask_rcnn.pth out.pth --arch tiny++ \
        --config configs/det/mask-rcnn_dat-t++_fpn_ms-crop-3x_coco.py
"""
import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dat_mm import DAT  # noqa: E402
from dat_mm import checkpoint  # noqa: E402
from dat_mm.checkpoint import RECOMPUTED_BUFFERS, adapt_state_dict, unwrap_state_dict  # noqa: E402


def read_checkpoint(path: str) -> dict:
    try:
        return checkpoint.read_checkpoint(path)
    except checkpoint.UnsafeCheckpointError as err:
        raise SystemExit(checkpoint.unsafe_message(path, err))


def _check_against_config(state: dict, config: str) -> None:
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    scope = cfg.default_scope
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        own = registry.build(cfg.model).state_dict()
    unknown = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k.rsplit('.', 1)[-1] not in RECOMPUTED_BUFFERS
                     and not k.startswith(('backbone.norm', 'data_preprocessor.')))
    shapes = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if unknown or missing or shapes:
        raise SystemExit(f'Checkpoint does not fit {config}: unknown {unknown[:8]}, missing {missing[:8]}, '
                         f'other shape {shapes[:8]}')


def convert(src: str, dst: str, arch, config: Optional[str] = None) -> dict:
    """Converts ``src`` to ``dst``; returns the saved state dict."""
    state = unwrap_state_dict(read_checkpoint(src))
    backbone = DAT(arch=arch)
    is_model = any(k.startswith('backbone.') for k in state)
    try:
        weights = adapt_state_dict(backbone, state, prefix='backbone.' if is_model else '')
    except ValueError as err:
        raise SystemExit(f'{src}: {err}')
    if is_model:
        rest = OrderedDict((k, v) for k, v in state.items() if not k.startswith('backbone.'))
        weights = OrderedDict([*((f'backbone.{k}', v) for k, v in weights.items()), *rest.items()])
        if config:
            _check_against_config(weights, config)
    meta = dict(converted_from=str(src), dat_arch=arch, kind='model' if is_model else 'backbone')
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict=weights, meta=meta), dst)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help="the authors' checkpoint")
    parser.add_argument('dst', help='output file')
    parser.add_argument('--arch', required=True,
                        help="DAT arch of the checkpoint: tiny, small, base, tiny++, small++, base++ or a JSON dict")
    parser.add_argument('--config', help='(whole models) check every key against the model this config builds')
    args = parser.parse_args()
    arch = json.loads(args.arch) if args.arch.strip().startswith('{') else args.arch
    weights = convert(args.src, args.dst, arch, args.config)
    kind = 'load_from' if any(k.startswith('backbone.') for k in weights) else "init_cfg=dict(type='Pretrained')"
    print(f'Wrote {len(weights)} tensors to {args.dst}; use it with {kind}')


if __name__ == '__main__':
    main()
