"""The demo: train, interrupt, resume and evaluate a DAT detector and a DAT segmentor on the tiny dataset,
then draw what they predict and where the deformable attention looks.

Each step runs the project's own tools (tools/train.py, tools/test.py, tools/demo_figures.py) as a user
would. The first training run stops halfway, as an interrupted job would; the second resumes from its last
checkpoint.

    python tools/demo.py [--work-dir work_dirs/demo]
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

# name, config, figure task, metrics reported
JOBS = [
    ('detector', 'configs/det/demo/mask-rcnn_dat-mini_fpn_tiny-coco.py', 'det', ('coco/bbox_mAP', 'coco/segm_mAP')),
    ('segmentor', 'configs/seg/demo/upernet_dat-mini_tiny-ade.py', 'seg', ('mIoU', 'aAcc')),
]


def run(cmd: list, log: Path) -> str:
    """Runs a tool, echoing its log lines about progress, and returns its whole output."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
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
    args = parser.parse_args()
    work_root = (ROOT / args.work_dir).resolve()
    python = sys.executable
    start = time.time()

    # Written afresh each run (deterministic, about a second), so that it always matches the generator.
    subprocess.run([python, 'tools/make_tiny_dataset.py', 'data/tiny'], cwd=ROOT, check=True)

    plot = work_root / 'loss_curves.png'
    results, curves, figures = {}, {}, [plot]
    for name, config, task, metrics in JOBS:
        max_iters = Config.fromfile(str(ROOT / config)).train_cfg.max_iters
        half = max_iters // 2
        wd = work_root / name
        shutil.rmtree(wd, ignore_errors=True)   # each demo run starts over
        wd.mkdir(parents=True)
        print(f'\n[{name}] {config}\n  1. training, stopping at iteration {half} of {max_iters} '
              '(as an interrupted job would)', flush=True)
        train_start = time.time()
        run([python, 'tools/train.py', config, '--work-dir', str(wd), '--cfg-options',
             f'train_cfg.max_iters={half}'], wd / 'train_1.log')
        print(f'  2. resuming from {last_checkpoint(str(wd))}', flush=True)
        out = run([python, 'tools/train.py', config, '--work-dir', str(wd), '--resume'], wd / 'train_2.log')
        resumed = re.search(r'resumed epoch: \d+, iter: (\d+)', out)
        if not resumed or int(resumed.group(1)) != half:
            raise SystemExit(f'[{name}] the second run did not resume at iteration {half}; see {wd / "train_2.log"}')
        train_minutes = (time.time() - train_start) / 60
        checkpoint = last_checkpoint(str(wd))
        print(f'  3. evaluating {checkpoint}', flush=True)
        out = run([python, 'tools/test.py', config, checkpoint, '--work-dir', str(wd / 'test')], wd / 'test.log')
        scores = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
        results[name] = (checkpoint, train_minutes, {m: scores[m] for m in metrics})
        curves[name] = (read_losses(wd), half)
        figure = work_root / f'{name}_val.png'
        print(f'  4. drawing its predictions on val images: {figure}', flush=True)
        run([python, 'tools/demo_figures.py', task, config, checkpoint, str(figure)], wd / 'figures.log')
        figures.append(figure)

    plot_losses(curves, plot)
    print(f'\nDemo finished in {(time.time() - start) / 60:.1f} minutes. Logs: {work_root}/<detector|segmentor>/')
    print('Pictures:\n' + '\n'.join(f'  {path}' for path in figures))
    rows = [(name, metric, f'{value:.3f}' if metric.startswith('coco') else f'{value:.2f}', f'{minutes:.1f} min',
             str(Path(checkpoint).relative_to(ROOT)) if Path(checkpoint).is_relative_to(ROOT) else checkpoint)
            for name, (checkpoint, minutes, scores) in results.items() for metric, value in scores.items()]
    header = ('model', 'metric', 'value', 'training time', 'checkpoint')
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header, tuple('-' * w for w in widths)] + rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == '__main__':
    main()
