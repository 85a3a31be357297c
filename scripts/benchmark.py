#!/usr/bin/env python
"""Side-by-side speed of our Swin against timm's and torchvision's, in one process on the same input.

Every contender gets the same weights (converted), input, batch, dtype, threads and device. Rounds are
interleaved (A, B, C, A, B, C, ...) so that machine noise hits everyone alike; a round times ``--iters`` steps
of each contender back to back, and the median of the rounds' per-step times is reported, with the ratio
ours / best peer, the peak memory of a step, and the achieved fraction of the machine's matmul roofline
(measured in the same run with a large matmul of the same dtype).

On CUDA the steps are timed with CUDA events, with no host sync between a round's steps (a host-timed step
would include the launch latency and the sync itself), and the roofline is a matmul large enough (8192^3) to
dwarf launch overhead, timed over 20 launches. The peak memory of a contender is its own: the bytes of its
weights, buffers and optimizer state plus the most its step allocates on top (``max_memory_allocated`` after
``reset_peak_memory_stats``, less what was allocated before the step), so the other contenders' weights and
optimizer state held in the same process do not count. On CPU, with ``--cpu-memory``, a fresh process per
contender measures the peak RSS of its train steps.

Example: python scripts/benchmark.py --model tiny --batch-size 8 --modes infer train --dtypes fp32 bf16
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import SwinTransformer  # noqa: E402
from models.convert import timm_to_official  # noqa: E402

VARIANTS = {  # name: (timm name, torchvision name, our kwargs)
    'tiny': ('swin_tiny_patch4_window7_224', 'swin_t', dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'small': ('swin_small_patch4_window7_224', 'swin_s', dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
    'base': ('swin_base_patch4_window7_224', 'swin_b', dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))),
}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
IMPLS = ('ours', 'timm', 'torchvision')


def build_contenders(variant: str, device: torch.device, only: str = '',
                     impls: Sequence[str] = IMPLS) -> Dict[str, torch.nn.Module]:
    """ours, timm and torchvision Swin (those of ``impls``); ours carries timm's weights (converted) when timm is
    built, torchvision its own init.

    ``only`` builds just that contender (random weights), for the memory probe.
    """
    import timm
    import torchvision
    timm_name, tv_name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    out = {}
    wanted = [only] if only else list(impls)
    if 'timm' in wanted:
        out['timm'] = timm.create_model(timm_name, pretrained=False)
    if 'ours' in wanted:
        out['ours'] = SwinTransformer(img_size=224, window_size=7, drop_path_rate=0.0, **kwargs)
        if 'timm' in out:
            out['ours'].load_state_dict(timm_to_official(out['timm'].state_dict()))
    if 'torchvision' in wanted:
        tv = getattr(torchvision.models, tv_name)()
        for m in tv.modules():  # same regularisation as the others: no stochastic depth
            if isinstance(m, torchvision.ops.StochasticDepth):
                m.p = 0.0
        out['torchvision'] = tv
    return {name: out[name].to(device) for name in IMPLS if name in out}


def make_step(model: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device,
              x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """A closure running one inference batch or one train step (forward, backward, AdamW)."""
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    if mode == 'infer':
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)
        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with autocast:
            loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.optimizer = optimizer  # type: ignore[attr-defined]  # its state counts in the contender's memory
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_per_call(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls in a row: between two CUDA events on CUDA (no host
    sync between the calls, one after them), by the host clock on CPU."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def matmul_roofline(dtype: torch.dtype, device: torch.device, n: int = 0, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in this dtype on this device (median of ``repeats`` timings).

    On CUDA each timing covers 20 launches of an 8192^3 matmul (about 1.4 ms each in bf16 on an H200); one
    2048^3 matmul between host syncs takes about 20 us there, the order of the launch and sync overhead."""
    cuda = device.type == 'cuda'
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, cuBLAS workspace
    sync(device)
    times = [time_per_call(lambda: a @ b, device, 20 if cuda else 1) for _ in range(repeats)]
    return 2 * n ** 3 / statistics.median(times)


def step_flops(model: torch.nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor) -> float:
    """FLOPs of one batch (forward, or forward+backward for training) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.train(mode == 'train')
    with counter:
        out = model(x)
        if mode == 'train':
            torch.nn.functional.cross_entropy(out, target).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return float(counter.get_total_flops())


def own_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Device bytes of ``model``'s weights and buffers and of ``optimizer``'s state (each storage once)."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors
                if t.device.type != 'cpu'}
    return sum(storages.values())


def cuda_peak_memory_mb(model: torch.nn.Module, step: Callable[[], None]) -> float:
    """Peak memory of one ``step`` of ``model`` alone (MiB): its own weights, buffers and optimizer state plus
    the most the step allocates on top of what was allocated before it; the other contenders' weights and
    optimizer state, held in the same process, do not count."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (own_bytes(model, getattr(step, 'optimizer', None)) + torch.cuda.max_memory_allocated() - before) / 2 ** 20


def cpu_peak_memory_mb(args: argparse.Namespace, name: str, mode: str, dtype_name: str) -> float:
    """Peak RSS growth of train steps, measured in a fresh process per contender (one heap each)."""
    cmd = [sys.executable, os.path.abspath(__file__), '--_memory-probe', name, '--model', args.model,
           '--batch-size', str(args.batch_size), '--modes', mode, '--dtypes', dtype_name,
           '--threads', str(args.threads), '--device', 'cpu']
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])['peak_mb']


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now; VmHWM: peak of this program image).

    Not ru_maxrss: Linux carries that over from the parent through fork and exec.
    """
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def memory_probe(args: argparse.Namespace) -> None:
    """Run in a fresh process: peak RSS growth of train steps over the built model (MiB), as JSON."""
    device = torch.device('cpu')
    model = build_contenders(args.model, device, only=args._memory_probe)[args._memory_probe]
    x = torch.randn(args.batch_size, 3, 224, 224)
    target = torch.randint(0, 1000, (args.batch_size,))
    step = make_step(model, args.modes[0], DTYPES[args.dtypes[0]], device, x, target)
    base = _proc_status_mb('VmRSS')
    for _ in range(2):  # the second step has optimizer state and gradients from the first
        step()
    print(json.dumps({'peak_mb': _proc_status_mb('VmHWM') - base}))


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    contenders = build_contenders(args.model, device, impls=args.impls)
    iters = args.iters or (10 if device.type == 'cuda' else 1)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    diffs = {}
    if 'timm' in contenders:
        with torch.no_grad():
            ref = contenders['timm'].eval()(x)
            diffs = {n: (m.eval()(x) - ref).abs().max().item() for n, m in contenders.items() if n != 'torchvision'}
    rows = []
    for mode in args.modes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            if dtype == torch.float16 and device.type != 'cuda':
                print(f'skip fp16 on {device.type}')
                continue
            counted = contenders['ours'] if 'ours' in contenders else next(iter(contenders.values()))
            flops = step_flops(counted, mode, x[:1], target[:1]) * args.batch_size
            roof = matmul_roofline(dtype, device)
            if device.type == 'cpu' and dtype != torch.float32:
                # a low-precision matmul may run through the fp32 kernel (models/lowp.py): the roofline is the
                # faster of the two
                roof = max(roof, matmul_roofline(torch.float32, device))
            steps = {}
            for name, model in contenders.items():
                if args.compile:
                    model = torch.compile(model)
                steps[name] = make_step(model, mode, dtype, device, x, target)
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            sync(device)
            times: Dict[str, List[float]] = {n: [] for n in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    times[name].append(time_per_call(step, device, iters))
            result = {}
            for name in steps:
                median = statistics.median(times[name])
                if device.type == 'cuda':
                    peak = cuda_peak_memory_mb(contenders[name], steps[name])
                elif args.cpu_memory and mode == 'train':
                    peak = cpu_peak_memory_mb(args, name, mode, dtype_name)
                else:
                    peak = float('nan')
                result[name] = dict(img_s=args.batch_size / median, ms=median * 1e3, peak_mb=peak,
                                    roofline=flops / median / roof)
            peers = [r['img_s'] for name, r in result.items() if name != 'ours']
            best_peer = max(peers) if peers else float('nan')
            for name, r in result.items():
                rows.append(dict(mode=mode, dtype=dtype_name, impl=name, batch=args.batch_size, device=device.type,
                                 threads=args.threads, compile=args.compile, img_s=round(r['img_s'], 2),
                                 ms_median=round(r['ms'], 1), ratio_vs_best_peer=round(r['img_s'] / best_peer, 3),
                                 peak_mb=round(r['peak_mb'], 1), roofline_frac=round(r['roofline'], 3),
                                 matmul_tflops=round(roof / 1e12, 3), max_abs_diff_vs_timm=f"{diffs[name]:.1e}" if name in diffs else 'n/a'))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write_tables(rows: List[dict], out_prefix: str) -> None:
    with open(out_prefix + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = ['mode', 'dtype', 'impl', 'img_s', 'ratio_vs_best_peer', 'ms_median', 'peak_mb', 'roofline_frac',
            'max_abs_diff_vs_timm']
    with open(out_prefix + '.md', 'w') as f:
        f.write('| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols) + '\n')
        for r in rows:
            f.write('| ' + ' | '.join(str(r[c]) for c in cols) + ' |\n')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', choices=sorted(VARIANTS), default='tiny')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    p.add_argument('--dtypes', nargs='+', choices=sorted(DTYPES), default=['fp32', 'bf16'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--iters', type=int, default=0,
                   help='steps per contender per round (default: 10 on CUDA, timed with CUDA events; 1 on CPU)')
    p.add_argument('--impls', nargs='+', choices=IMPLS, default=list(IMPLS),
                   help='contenders (default: all; ours gets timm\'s weights when timm is among them)')
    p.add_argument('--compile', action='store_true', help='torch.compile every contender')
    p.add_argument('--cpu-memory', action='store_true',
                   help='on CPU, measure the peak memory of a train step in a subprocess per contender')
    p.add_argument('--out', default='', help='write <out>.csv and <out>.md')
    p.add_argument('--_memory-probe', dest='_memory_probe', default='', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args._memory_probe:
        torch.set_num_threads(args.threads)
        memory_probe(args)
        return
    rows = run(args)
    if args.out and rows:
        write_tables(rows, args.out)
        print(f'wrote {args.out}.csv and {args.out}.md')


if __name__ == '__main__':
    main()
