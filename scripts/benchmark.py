#!/usr/bin/env python
"""Side-by-side speed of our Swin against timm's and torchvision's, in one process on the same input.

Every contender gets the same weights (converted), input, batch, dtype, threads and device. Rounds are
interleaved (A, B, C, A, B, C, ...) so that machine noise hits everyone alike; the median of the timed rounds
is reported, with the ratio ours / best peer, the peak memory of a step, and the achieved fraction of the
machine's matmul roofline (measured in the same run with a large matmul of the same dtype).

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
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import SwinTransformer  # noqa: E402
from models.convert import timm_to_official  # noqa: E402

VARIANTS = {  # name: (timm name, torchvision name, our kwargs)
    'tiny': ('swin_tiny_patch4_window7_224', 'swin_t', dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'small': ('swin_small_patch4_window7_224', 'swin_s', dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
    'base': ('swin_base_patch4_window7_224', 'swin_b', dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))),
}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def build_contenders(variant: str, device: torch.device, only: str = '') -> Dict[str, torch.nn.Module]:
    """ours, timm and torchvision Swin; ours carries timm's weights (converted), torchvision its own init.

    ``only`` builds just that contender (random weights), for the memory probe.
    """
    import timm
    import torchvision
    timm_name, tv_name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    out = {}
    if only in ('', 'timm'):
        out['timm'] = timm.create_model(timm_name, pretrained=False)
    if only in ('', 'ours'):
        out['ours'] = SwinTransformer(img_size=224, window_size=7, drop_path_rate=0.0, **kwargs)
        if 'timm' in out:
            out['ours'].load_state_dict(timm_to_official(out['timm'].state_dict()))
    if only in ('', 'torchvision'):
        tv = getattr(torchvision.models, tv_name)()
        for m in tv.modules():  # same regularisation as the others: no stochastic depth
            if isinstance(m, torchvision.ops.StochasticDepth):
                m.p = 0.0
        out['torchvision'] = tv
    order = ['ours', 'timm', 'torchvision']
    return {name: out[name].to(device) for name in order if name in out}


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
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def matmul_roofline(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in this dtype on this device (median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
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
    contenders = build_contenders(args.model, device)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
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
            flops = step_flops(contenders['ours'], mode, x[:1], target[:1]) * args.batch_size
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
            times: Dict[str, List[float]] = {n: [] for n in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    sync(device)
                    t = time.perf_counter()
                    step()
                    sync(device)
                    times[name].append(time.perf_counter() - t)
            result = {}
            for name in steps:
                median = statistics.median(times[name])
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats()
                    steps[name]()
                    sync(device)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 20
                elif args.cpu_memory and mode == 'train':
                    peak = cpu_peak_memory_mb(args, name, mode, dtype_name)
                else:
                    peak = float('nan')
                result[name] = dict(img_s=args.batch_size / median, ms=median * 1e3, peak_mb=peak,
                                    roofline=flops / median / roof)
            best_peer = max(result['timm']['img_s'], result['torchvision']['img_s'])
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
