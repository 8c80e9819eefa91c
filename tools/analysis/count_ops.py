"""Ops dispatched per backbone step, host syncs and peak memory: the GPU launch count, measured on any machine.

On a GPU every dispatched ATen op is at least one kernel launch, at roughly 5-20 us of host time in eager mode,
and every host sync (``.item()``, ``.tolist()``, ``unique``, ``nonzero``) stalls the stream; a CPU benchmark
shows neither. This tool counts both with a ``TorchDispatchMode``, exactly as a GPU would dispatch them, on
CPU tensors: per inference forward, per training forward and per training backward, each also as a multiple
of Swin-T's at the same size. Views, which launch nothing, are not counted.

DAT models run the attention plan of ``--plan`` (default ``device``, the GPU's; see
``dat_mm/models/layers/plan.py``). Each model runs in its own process: one training step (forward and
backward of the sum of the outputs) whose peak resident memory is measured, then a counted training step
and a counted inference forward.

    python tools/analysis/count_ops.py                            # 1344x800, batch 2, device plan
    python tools/analysis/count_ops.py --sizes 1344x800 672x400   # does the count grow with the image?
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))
from benchmark import SWIN, backbone, reset_peak_rss, rss_mb  # noqa: E402

MODELS = {'DAT-T++': dict(arch='tiny++'), 'DAT-T (1,1,2,1)': dict(arch='tiny', deform_strides=(1, 1, 2, 1)),
          SWIN: None}
# Ops that read a tensor's value back to the host: on CUDA each waits for the stream to drain.
SYNC_OPS = ('_local_scalar_dense', 'item', 'nonzero', 'masked_select', '_unique', '_unique2', 'unique_dim',
            'unique_consecutive', 'tolist')
NOT_LAUNCHES = {'detach', 'lift_fresh', '_unsafe_view', 'alias'}


class OpCounter:
    """Counts the ops dispatched while active, views excluded, and the host syncs among them.
    ``Tensor.tolist`` reads CPU memory without dispatching, so it is counted by a wrapper."""

    def __init__(self):
        self.ops, self.syncs = Counter(), Counter()

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not func.is_view and name not in NOT_LAUNCHES:
                    counter.ops[name] += 1
                    if name in SYNC_OPS:
                        counter.syncs[name] += 1
                return func(*args, **(kwargs or {}))

        self._tolist = torch.Tensor.tolist

        def tolist(tensor):
            counter.syncs['tolist'] += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch
        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist

    def total(self) -> int:
        return sum(self.ops.values())


def measure(name: str, height: int, width: int, batch: int, top: int) -> dict:
    """Runs in the child process."""
    import torch
    model, source = backbone(MODELS[name], height, width)
    x = torch.randn(batch, 3, height, width)

    def train_step(count_forward=None, count_backward=None):
        model.train()
        with count_forward or contextlib.nullcontext():
            feats = model(x)
        loss = sum(f.float().sum() for f in feats)
        with count_backward or contextlib.nullcontext():
            loss.backward()
        model.zero_grad(set_to_none=True)

    base = reset_peak_rss()
    train_step()   # also fills the attention layers' per-size caches, as any step after the first finds them
    peak = rss_mb('VmHWM') - base
    forward, backward, inference = OpCounter(), OpCounter(), OpCounter()
    train_step(forward, backward)
    model.eval()
    with torch.no_grad(), inference:
        model(x)
    from dat_mm.models.layers.plan import attention_plan
    return dict(source=source, plan=None if source else attention_plan(x.device), peak_mb=peak,
                **{key: dict(ops=c.total(), syncs=dict(c.syncs), top=c.ops.most_common(top))
                   for key, c in (('inference', inference), ('forward', forward), ('backward', backward))})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['1344x800'], help='WxH')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--plan', choices=['device', 'cpu'], default='device',
                        help='attention plan of the DAT models (DAT_MM_ATTENTION_PLAN)')
    parser.add_argument('--top', type=int, default=5, help='list the most frequent ops of each model')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return 0

    env = dict(os.environ, PYTHONWARNINGS='ignore', DAT_MM_ATTENTION_PLAN=args.plan)
    print(f'batch {args.batch}, CPU tensors, {args.plan} plan for DAT; ops as a GPU would launch them', flush=True)
    results = {}
    for size in args.sizes:
        w, h = map(int, size.lower().split('x'))
        for name in args.models:
            cmd = [sys.executable, __file__, '--child', json.dumps([name, h, w, args.batch, args.top])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                print(f'  {size} {name}: failed\n{proc.stderr[-2000:]}', flush=True)
                continue
            r = results[size, name] = json.loads(proc.stdout.strip().splitlines()[-1])
            tops = '; '.join(f'{op} {n}' for op, n in Counter(dict(r['forward']['top'])).most_common(args.top))
            print(f'  {size} {name}: inference {r["inference"]["ops"]}, train fwd {r["forward"]["ops"]}, '
                  f'bwd {r["backward"]["ops"]} (train fwd: {tops})', flush=True)

    print('\n| size | model | plan | inference fwd | train fwd | train bwd | inference / Swin-T | fwd+bwd / Swin-T '
          '| host syncs | peak memory fwd+bwd (MB) | memory / Swin-T |\n'
          '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for (size, name), r in results.items():
        swin = results.get((size, SWIN))
        train = r['forward']['ops'] + r['backward']['ops']
        if swin and name != SWIN:
            ratios = (f"{r['inference']['ops'] / swin['inference']['ops']:.2f}x | "
                      f"{train / (swin['forward']['ops'] + swin['backward']['ops']):.2f}x")
            memory = f"{r['peak_mb'] / swin['peak_mb']:.2f}x"
        else:
            ratios, memory = ' | ', ''
        syncs = Counter()
        for key in ('inference', 'forward', 'backward'):
            syncs.update(r[key]['syncs'])
        label = f"{name} ({r['source']})" if r['source'] else name
        print(f"| {size} | {label} | {r['plan'] or '-'} | {r['inference']['ops']} | {r['forward']['ops']} | "
              f"{r['backward']['ops']} | {ratios} | {sum(syncs.values())} | {r['peak_mb']:.0f} | {memory} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
