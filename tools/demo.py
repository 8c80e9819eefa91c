"""The demo: train, interrupt, resume and evaluate a DAT detector and a DAT segmentor on the tiny dataset.

Each step runs the project's own tools (tools/train.py, tools/test.py) as a user would. The first training
run stops halfway, as an interrupted job would; the second resumes from its last checkpoint.

    python tools/demo.py [--work-dir work_dirs/demo] [--data data/tiny]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dat_mm.runner import last_checkpoint  # noqa: E402
from mmengine.config import Config  # noqa: E402

JOBS = [
    ('detector', 'configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py', ('coco/bbox_mAP', 'coco/segm_mAP')),
    ('segmentor', 'configs/seg/demo/upernet_dat-mini_tiny-ade.py', ('mIoU', 'aAcc')),
]


def run(cmd: list, log: Path) -> str:
    """Runs a tool, echoing its log lines about progress, and returns its whole output."""
    env = dict(os.environ, PYTHONWARNINGS='ignore', PYTHONUNBUFFERED='1')
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r'Iter\((train|val|test)\)|resumed|Traceback|Error', line):
                print('    ' + line.rstrip()[:160], flush=True)
    output = ''.join(lines)
    log.write_text(output)
    if proc.returncode:
        print(output[-4000:])
        raise SystemExit(f'{" ".join(cmd)} failed (exit {proc.returncode}); full log: {log}')
    return output


def read_losses(work_dir: Path) -> list:
    """(iteration, loss) from every run's MMEngine scalar log in ``work_dir``, resumed runs included."""
    points = {}
    for scalars in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record and 'step' in record:
                points[record['step']] = record['loss']
    return sorted(points.items())


def plot_losses(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, (points, resumed_at)) in zip(axes, curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker='.')
        ax.axvline(resumed_at, color='grey', linestyle='--', label=f'resumed at {resumed_at}')
        ax.set(title=f'DAT {name}', xlabel='iteration', ylabel='training loss')
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data', default='data/tiny', help='tiny dataset root (made if missing)')
    args = parser.parse_args()
    work_root = (ROOT / args.work_dir).resolve()
    python = sys.executable
    start = time.time()

    data = ROOT / args.data
    if not (data / 'coco' / 'val.json').exists():
        subprocess.run([python, 'tools/make_tiny_dataset.py', str(data)], cwd=ROOT, check=True)
    if data.resolve() != (ROOT / 'data' / 'tiny').resolve():
        raise SystemExit('The demo configs read data/tiny; pass no --data or link it there')

    results, curves = {}, {}
    for name, config, metrics in JOBS:
        max_iters = Config.fromfile(str(ROOT / config)).train_cfg.max_iters
        half = max_iters // 2
        wd = work_root / name
        shutil.rmtree(wd, ignore_errors=True)   # each demo run starts over
        wd.mkdir(parents=True)
        print(f'\n[{name}] {config}\n  1. training, stopping at iteration {half} of {max_iters} '
              '(as an interrupted job would)', flush=True)
        run([python, 'tools/train.py', config, '--work-dir', str(wd), '--cfg-options',
             f'train_cfg.max_iters={half}'], wd / 'train_1.log')
        print(f'  2. resuming from {last_checkpoint(str(wd))}', flush=True)
        out = run([python, 'tools/train.py', config, '--work-dir', str(wd), '--resume'], wd / 'train_2.log')
        resumed = re.search(r'resumed epoch: \d+, iter: (\d+)', out)
        if not resumed or int(resumed.group(1)) != half:
            raise SystemExit(f'[{name}] the second run did not resume at iteration {half}; see {wd / "train_2.log"}')
        checkpoint = last_checkpoint(str(wd))
        print(f'  3. evaluating {checkpoint}', flush=True)
        out = run([python, 'tools/test.py', config, checkpoint, '--work-dir', str(wd / 'test')], wd / 'test.log')
        scores = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
        results[name] = (checkpoint, {m: scores[m] for m in metrics})
        curves[name] = (read_losses(wd), half)

    plot = work_root / 'loss_curves.png'
    plot_losses(curves, plot)
    print(f'\nDemo finished in {(time.time() - start) / 60:.1f} minutes.')
    for name, (checkpoint, scores) in results.items():
        first, last = curves[name][0][0][1], curves[name][0][-1][1]
        shown = ', '.join(f'{k} {v:.3f}' if 'coco' in k else f'{k} {v:.2f}' for k, v in scores.items())
        print(f'  {name:<10} {shown}; training loss {first:.2f} -> {last:.2f}')
        print(f'             checkpoint {checkpoint}')
    print(f'  logs:        {work_root}/<detector|segmentor>/*.log and <timestamp>/ folders')
    print(f'  loss curves: {plot}')


if __name__ == '__main__':
    main()
