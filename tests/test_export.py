"""tools/export_onnx.py: small DAT++ and DAT v1 backbones and a segmentor, exported with dynamic height and
width and checked in onnxruntime against PyTorch at three shapes."""
import re
import subprocess
import sys

import pytest

from commands import ROOT, run_tool

onnx = pytest.importorskip('onnx', reason='the deploy extra (onnx, onnxruntime) is installed on the current stack only')

# A DAT v1 detector shrunk to the size of the demo's DAT++ (same pattern of window, shifted-window and
# deformable blocks as DAT-T, stage-3 deformable stride 2 as the v1 configs).
V1_MINI_CONFIG = f"""
_base_ = '{ROOT}/configs/det/mask-rcnn_dat-t_fpn_1x_coco.py'
model = dict(backbone=dict(arch=dict(_delete_=True, version=1, dims=(24, 48, 96, 192), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                                     groups=(1, 1, 2, 4), blocks=('LS', 'LS', 'LD', 'LD'))),
             neck=dict(in_channels=[24, 48, 96, 192]))
"""


def _differences(out: str) -> dict:
    """'file at HxW' -> max abs difference, as the tool prints them."""
    return {f'{name} at {shape}': float(diff)
            for name, shape, diff in re.findall(r'(\S+\.onnx) at (\d+x\d+): max abs difference (\S+)', out)}


@pytest.mark.parametrize('config', ['configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py', 'v1'])
def test_backbone_exports_with_dynamic_size_and_matches_pytorch(config, tmp_path):
    if config == 'v1':
        config = tmp_path / 'mask-rcnn_dat-v1-mini.py'
        config.write_text(V1_MINI_CONFIG)
    out = run_tool(['tools/export_onnx.py', config, '--shape', '96', '160', '--out', tmp_path / 'b.onnx',
                    '--check'], ROOT)
    diffs = _differences(out)
    assert set(diffs) == {'b.onnx at 96x160', 'b.onnx at 160x96', 'b.onnx at 136x232'}, out[-2000:]
    assert max(diffs.values()) < 1e-4 and 'PASS' in out
    graph = onnx.load(str(tmp_path / 'b.onnx'))
    assert graph.opset_import[0].version == 17
    assert {n.op_type for n in graph.graph.node} >= {'GridSample'}
    assert all(n.domain in ('', 'ai.onnx') for n in graph.graph.node), 'standard operators only'
    height, width = graph.graph.input[0].type.tensor_type.shape.dim[2:]
    assert (height.dim_param, width.dim_param) == ('height', 'width')


def test_segmentor_exports_whole_with_its_pyramid_pooling(tmp_path):
    out = run_tool(['tools/export_onnx.py', 'configs/seg/demo/upernet_dat-mini_tiny-ade.py', '--shape', '128',
                    '128', '--out', tmp_path / 'seg.onnx', '--check'], ROOT)
    diffs = _differences(out)
    assert {'seg_segmentor.onnx at 128x128', 'seg_segmentor.onnx at 168x200'} <= set(diffs), out[-2000:]
    assert max(diffs.values()) < 1e-4
    logits = onnx.load(str(tmp_path / 'seg_segmentor.onnx')).graph.output[0]
    assert logits.type.tensor_type.shape.dim[1].dim_value == 4   # background + three shapes


def test_export_refuses_a_too_small_shape(tmp_path):
    proc = subprocess.run([sys.executable, 'tools/export_onnx.py', 'configs/seg/demo/upernet_dat-mini_tiny-ade.py',
                           '--shape', '16', '64', '--out', str(tmp_path / 'x.onnx')], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and 'at least 32 pixels' in proc.stderr


def test_dat_t_pp_backbone_at_detection_size_matches_pytorch(tmp_path):
    """The DAT-T++ detection backbone exported at 800x1344, run by onnxruntime at that size: the exported graph
    (tiles, four parts of queries per deformable layer) gives PyTorch's numbers where detection runs."""
    import numpy as np
    import onnxruntime
    import torch
    from mmengine.config import Config
    sys.path.insert(0, str(ROOT / 'tools'))
    from export_onnx import export
    from dat_mm.runner import build_model
    cfg = Config.fromfile(str(ROOT / 'configs/det/mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py'))
    torch.manual_seed(0)
    backbone = build_model(cfg).backbone
    backbone.init_weights()
    path = tmp_path / 'dat-t++.onnx'
    export(backbone, (800, 1344), path, [f'stage{i}' for i in range(4)])
    image = torch.randn(1, 3, 800, 1344, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(image)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(None, {'image': image.numpy()})
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    assert max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)) < 1e-4


def test_the_onnxruntime_benchmark_prints_its_table(tmp_path):
    out = run_tool([ROOT / 'tools/analysis/benchmark_onnx.py', '--sizes', '64x96', '--models', 'DAT-T++', 'Swin-T',
                    '--reps', '1'], tmp_path)
    rows = {m.group(1): m.group(2) for m in re.finditer(r'^\| 64x96 \| (DAT-T\+\+|Swin-T) \| (.*)$', out, re.M)}
    assert set(rows) == {'DAT-T++', 'Swin-T'}, out[-2000:]
    cells = [c.strip() for c in rows['DAT-T++'].split('|')]
    assert float(cells[0]) > 0 and float(cells[1]) > 0, rows
    assert re.fullmatch(r'\d+\.\d\dx', cells[2]) and re.fullmatch(r'\d+\.\d\dx', cells[3]), rows
