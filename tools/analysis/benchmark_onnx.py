"""Exported backbones in onnxruntime, as a deployer meets them: DAT-T++, DAT-T (1,1,2,1) and Swin-T side by side.

Every backbone is exported as tools/export_onnx.py exports DAT's (opset 17, dynamic height and width); Swin-T
is mmdet's. Every (model, size) then runs in a fresh process on
onnxruntime's CPU provider, batch 1: time is the median of --reps runs after one warm-up, peak memory the
process's peak resident set (weights, session and activations). The table gives DAT's time and memory as
multiples of Swin-T's at the same size, measured in the same run. Needs onnx and onnxruntime.

    python tools/analysis/benchmark_onnx.py                        # 800x1344 and 512x512 (H x W)
    python tools/analysis/benchmark_onnx.py --sizes 800x1344 --rounds 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))
from benchmark import backbone, ratio  # noqa: E402  (the PyTorch benchmark's models and ratio cells)

MODELS = {'DAT-T++': dict(arch='tiny++'), 'DAT-T (1,1,2,1)': dict(arch='tiny', deform_strides=(1, 1, 2, 1)),
          'Swin-T': None}
SWIN = 'Swin-T'


def export_model(name: str, height: int, width: int, path: str) -> dict:
    """Child process: writes the ONNX file; returns its size and the export time."""
    import torch
    sys.path.insert(0, str(ROOT / 'tools'))
    from export_onnx import export
    torch.manual_seed(0)
    model, _ = backbone(MODELS[name], height, width)
    if MODELS[name] is not None:
        model.init_weights()
    model.eval()
    start = time.perf_counter()
    export(model, (height, width), Path(path), [f'stage{i}' for i in range(4)])
    return dict(export_s=time.perf_counter() - start, megabytes=os.path.getsize(path) / 1e6)


def run_model(path: str, height: int, width: int, reps: int) -> dict:
    """Child process: times the ONNX file in onnxruntime and reads this process's peak resident set."""
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, height, width),
                                                                                     dtype=np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    with open('/proc/self/status') as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM'))
    return dict(seconds=statistics.median(times), peak_mb=peak, version=onnxruntime.__version__)


def child(args: list) -> dict:
    proc = subprocess.run([sys.executable, __file__, '--child', json.dumps(args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS='ignore'))
    if proc.returncode:
        return dict(error=(proc.stderr.strip().splitlines() or ['failed'])[-1][:100])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['800x1344', '512x512'], help='HxW')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=1, help='time every model this many times, alternating order')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(export_model(*rest) if kind == 'export' else run_model(*rest)))
        return 0

    print(f'onnxruntime CPU provider, {os.cpu_count()} cores, batch 1, median of {args.reps} after a warm-up',
          flush=True)
    results, exported = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            h, w = map(int, size.lower().split('x'))
            for name in args.models:
                path = os.path.join(tmp, f'{len(exported)}.onnx')
                exported[size, name] = path, child(['export', name, h, w, path])
                info = exported[size, name][1]
                shown = info.get('error') or f"{info['megabytes']:.0f} MB in {info['export_s']:.0f} s"
                print(f'  exported {name} at {size}: {shown}', flush=True)
        for k in range(args.rounds):
            order = [(s, n) for s in args.sizes for n in args.models]
            for size, name in (order if k % 2 == 0 else order[::-1]):
                h, w = map(int, size.lower().split('x'))
                path, info = exported[size, name]
                r = info if 'error' in info else child(['run', path, h, w, args.reps])
                results.setdefault((size, name), []).append(r)
                shown = r.get('error') or f"{r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB"
                print(f'  {size} {name}: {shown}' + (f' (round {k + 1})' if args.rounds > 1 else ''), flush=True)

    version = next((r['version'] for rs in results.values() for r in rs if 'version' in r), '?')
    print(f'\nonnxruntime {version}\n\n| size (HxW) | model | time (s) | peak RSS (MB) | time / Swin-T | memory / Swin-T |\n'
          '| --- | --- | --- | --- | --- | --- |')
    for (size, name), runs in results.items():
        if any('error' in r for r in runs):
            print(f'| {size} | {name} | {runs[0]["error"]} | | | |')
            continue
        swin = results.get((size, SWIN), [])
        vs = ' | '
        if name != SWIN and swin and not any('error' in r for r in swin):
            vs = (f"{ratio([r['seconds'] for r in runs], [r['seconds'] for r in swin])} | "
                  f"{ratio([r['peak_mb'] for r in runs], [r['peak_mb'] for r in swin])}")
        seconds, peak = (statistics.median(r[key] for r in runs) for key in ('seconds', 'peak_mb'))
        print(f'| {size} | {name} | {seconds:.2f} | {peak:.0f} | {vs} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
