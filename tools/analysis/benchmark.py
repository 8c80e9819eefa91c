"""Speed and peak memory of the DAT backbones: fast vs reference attention, against Swin-T.

Each measurement runs in its own process (batch 1 unless --batch). Peak memory is what the first pass adds on top
of the model and input (on CUDA torch's peak allocation; on CPU the peak resident set size, reset through
/proc/self/clear_refs); the time is the median of --reps further passes. Swin-T is mmdet's backbone, or
timm's where mmdet does not import (a GPU machine with mmcv-lite); the table gives each DAT row's time and
memory as multiples of Swin-T's at the same size, pass and precision. The fast DAT rows run the device's own
attention plan (dat_mm/models/layers/plan.py: cpu on CPU, device on CUDA); ``--plans`` adds or picks others,
whose rows say so: on CUDA both plans are timed by default. A machine whose speed drifts (shared or
throttled cores) moves each ratio with it; ``--rounds N`` measures every row N times, the rounds in
alternating order, and gives each ratio as the median of the rounds' own ratios, with their range.
``--compile`` adds each row compiled with ``torch.compile`` (inductor, static shapes), with its compile time (the
first pass, less a timed one) and the number of kernels inductor generated for it; its time is compared with
compiled Swin-T's, and its speed-up column is over the same row in eager mode.

    python tools/analysis/benchmark.py                          # 512x512, 640x640, 1344x800, fwd and fwd+bwd
    python tools/analysis/benchmark.py --sizes 1344x800 --models 'DAT-T++ fast' Swin-T --rounds 3
    python tools/analysis/benchmark.py --sizes 1344x800 --dtypes fp32 bf16 --device cuda
        # without a GPU: a dry run that lists what the GPU run would measure
    python tools/analysis/benchmark.py --sizes 1344x800 --models 'DAT-T++ fast' Swin-T --modes fwd+bwd --compile
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
SWIN = 'Swin-T'
MODELS = {
    'DAT-T fast': dict(arch='tiny'), 'DAT-T ref': dict(arch='tiny', reference_attention=True),
    # What the v1 detection and segmentation configs build: stage 3 sampled at stride 2.
    'DAT-T (1,1,2,1) fast': dict(arch='tiny', deform_strides=(1, 1, 2, 1)),
    'DAT-T++ fast': dict(arch='tiny++'), 'DAT-T++ ref': dict(arch='tiny++', reference_attention=True),
    SWIN: None,
}
DTYPES = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}


def rss_mb(field: str) -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak_rss() -> float:
    """Resets this process's peak resident set (VmHWM) to its current one and returns that, in MB."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return rss_mb('VmRSS')


def backbone(kwargs: Optional[dict], height: int, width: int):
    """(DAT(**kwargs), None), or (Swin-T, where it comes from) for kwargs None."""
    sys.path.insert(0, str(ROOT))
    if kwargs is None:
        return swin_tiny(height, width)
    from dat_mm import DAT
    return DAT(**kwargs), None


def swin_tiny(height: int, width: int):
    """(Swin-T backbone, where it comes from)."""
    try:
        from mmdet.models.backbones import SwinTransformer
    except ImportError:
        import timm
        return timm.create_model('swin_tiny_patch4_window7_224', features_only=True, img_size=(height, width),
                                 pretrained=False), 'timm'
    return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7), 'mmdet'


def measure(name: str, height: int, width: int, backward: bool, reps: int, device: str, dtype: str,
            batch: int, compiled: bool = False) -> dict:
    """Runs in the child process."""
    import contextlib

    import torch
    model, source = backbone(MODELS[name], height, width)
    model.to(device)
    model.train(backward)   # mmdet's Swin returns None from train(): no chaining
    if compiled:
        from torch._inductor import metrics
        model = torch.compile(model)
    x = torch.randn(batch, 3, height, width, device=device)
    cuda = device.startswith('cuda')
    low = DTYPES[dtype]

    def step():
        autocast = (torch.autocast(device.split(':')[0], dtype=getattr(torch, low)) if low
                    else contextlib.nullcontext())
        if backward:
            with autocast:
                loss = sum(f.float().sum() for f in model(x))
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast:
                model(x)
        if cuda:
            torch.cuda.synchronize()

    # Memory is read on the first pass: the allocator keeps memory freed by a pass resident (glibc), so
    # later passes would only show what the first one did not leave behind. Times come from later passes.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else rss_mb('VmHWM') - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = dict(seconds=statistics.median(times), peak_mb=peak, source=source)
    if compiled:
        # The first pass's peak is the compiler's: memory is left out of compiled rows.
        result.update(peak_mb=None, compile_s=first - result['seconds'], kernels=metrics.generated_kernel_count)
    return result


def run_child(name: str, size: tuple, backward: bool, reps: int, device: str, dtype: str, plan: str,
              batch: int, compiled: bool) -> dict:
    cmd = [sys.executable, __file__, '--child',
           json.dumps([name, *size, backward, reps, device, dtype, batch, compiled])]
    env = dict(os.environ, PYTHONWARNINGS='ignore', DAT_MM_ATTENTION_PLAN=plan)
    if compiled:   # a compile each time: from inductor's caches, later rounds would time a cache load
        env['TORCHINDUCTOR_FORCE_DISABLE_CACHES'] = '1'
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return dict(error=(proc.stderr.strip().splitlines() or ['failed'])[-1][:80])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(values: list, references: list) -> str:
    """The median of the rounds' own ratios, and with more than one round their range: '1.84x (1.71-2.01x)'."""
    ratios = sorted(v / r for v, r in zip(values, references))
    spread = f' ({ratios[0]:.2f}-{ratios[-1]:.2f}x)' if len(ratios) > 1 else ''
    return f'{statistics.median(ratios):.2f}x{spread}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['512x512', '640x640', '1344x800'], help='WxH')
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--batch', type=int, default=1, help='images per pass')
    parser.add_argument('--rounds', type=int, default=1,
                        help='measure every row this many times, in alternating order (ratios: median and range)')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'], choices=['fwd', 'fwd+bwd'])
    parser.add_argument('--dtypes', nargs='+', default=['fp32'], choices=list(DTYPES),
                        help='bf16, fp16: under torch.autocast')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--plans', nargs='+', choices=['cpu', 'device'],
                        help="attention plans of the fast DAT rows (default: the device's own; on CUDA both)")
    parser.add_argument('--compile', action='store_true',
                        help='also each row under torch.compile (inductor, static shapes): compile time, kernels')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return 0

    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    own = 'cpu' if device == 'cpu' else 'device'
    plans = args.plans or ([own] if own == 'cpu' else ['device', 'cpu'])
    # (label, model, plan): the plan matters to the fast attention only; a row not in the device's own plan says so.
    rows = [(name if plan == own else f'{name} ({plan} plan)', name, plan) for name in args.models
            for plan in (plans if name.endswith('fast') else [own])]
    rows = [(label + (' compiled' if compiled else ''), name, plan, compiled) for label, name, plan in rows
            for compiled in ([False, True] if args.compile else [False])]
    runs = [(size, mode, dtype, row) for size in args.sizes for mode in args.modes for dtype in args.dtypes
            for row in rows]
    if device.startswith('cuda') and not torch.cuda.is_available():
        # A dry run: shows on a CPU-only machine what the GPU run will measure, and measures nothing.
        print(f'dry run: --device {device} needs a GPU, and torch {torch.__version__} sees none. On a GPU machine '
              'this would measure:')
        for size, mode, dtype, (label, *_) in runs:
            print(f'  {size:>9} {mode:<7} {dtype} {label}')
        return 0
    where = torch.cuda.get_device_name() if device.startswith('cuda') else f'CPU ({os.cpu_count()} cores)'
    rounds = f', {args.rounds} rounds' if args.rounds > 1 else ''
    print(f'device: {where}, torch {torch.__version__}, batch {args.batch}, median of {args.reps}{rounds}', flush=True)
    results = {(size, mode, dtype, row): [] for size, mode, dtype, row in runs}
    for k in range(args.rounds):
        # Alternating order: a drift during the run weighs on the first rows in one round, on the last in the next.
        for size, mode, dtype, row in (runs if k % 2 == 0 else runs[::-1]):
            label, name, plan, compiled = row
            w, h = map(int, size.lower().split('x'))
            r = run_child(name, (h, w), mode == 'fwd+bwd', args.reps, device, dtype, plan, args.batch, compiled)
            results[size, mode, dtype, row].append(r)
            shown = r.get('error') or (f"{r['seconds']:.2f} s, compile {r['compile_s']:.0f} s, {r['kernels']} kernels"
                                       if compiled else f"{r['seconds']:.2f} s, {r['peak_mb']:.0f} MB")
            round_ = f' round {k + 1}' if args.rounds > 1 else ''
            print(f'  {size:>9} {mode:<7} {dtype} {label:<20} {shown}{round_}', flush=True)

    by_model = {row[1:]: row for row in rows}   # (model, plan, compiled) -> row

    def measured_ok(size, mode, dtype, key) -> list:
        """The rounds of the row (model, plan, compiled) at this size, pass and precision; [] if absent or failed."""
        found = results.get((size, mode, dtype, by_model.get(key)), [])
        return [] if any('error' in r for r in found) else found

    extra = ' compile (s) | kernels |' if args.compile else ''
    print('\n| size | pass | precision | model | time (s) | peak memory (MB) | time / Swin-T | memory / Swin-T '
          f'| speed-up: fast vs ref{", compiled vs eager" if args.compile else ""} |{extra}\n'
          f'| --- | --- | --- | --- | --- | --- | --- | --- | --- |{" --- | --- |" if args.compile else ""}')
    for (size, mode, dtype, (label, name, plan, compiled)), measured in results.items():
        errors = [r['error'] for r in measured if 'error' in r]
        if errors:
            print(f'| {size} | {mode} | {dtype} | {label} | {errors[0]} | | | | |{" | |" if args.compile else ""}')
            continue
        seconds = statistics.median(r['seconds'] for r in measured)
        swin = measured_ok(size, mode, dtype, (SWIN, own, compiled))
        vs_swin = ' | '
        if name != SWIN and swin:
            vs_swin = f"{ratio([r['seconds'] for r in measured], [r['seconds'] for r in swin])} | "
            if not compiled:
                vs_swin += ratio([r['peak_mb'] for r in measured], [max(r['peak_mb'], 1e-9) for r in swin])
        # Compiled rows: the speed-up over the same row in eager mode; fast rows: over the reference attention.
        base = ((name, plan, False) if compiled else
                (name.replace(' fast', ' ref'), own, False) if name.endswith(' fast') else None)
        ref = measured_ok(size, mode, dtype, base) if base else []
        speedup = ratio([r['seconds'] for r in ref], [r['seconds'] for r in measured]) if ref else ''
        peak = '-' if compiled else f"{statistics.median(r['peak_mb'] for r in measured):.0f}"
        label = f"{label} ({measured[0]['source']})" if measured[0].get('source') else label
        cells = ''
        if args.compile:
            cells = (f" {statistics.median(r['compile_s'] for r in measured):.0f} | {measured[0]['kernels']} |"
                     if compiled else ' | |')
        print(f"| {size} | {mode} | {dtype} | {label} | {seconds:.2f} | {peak} | {vs_swin} | {speedup} |{cells}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
