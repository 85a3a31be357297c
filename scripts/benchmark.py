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

Ours runs with the named fast paths that ``main.py`` would choose (``--fast-paths measure``, the default: the same
``engine.select_fast_paths`` on the same cache, once per dtype before any row is timed; a second run reads the
cache and is instant); ``all`` and ``none`` pin them for comparison. The ``fast_paths`` column lists what is off.

``--compile`` compiles every contender (inductor on the CPU): the first calls until warm are timed apart
(``compile_s``: the warm-up calls less as many steady steps) and the graph breaks dynamo hit while compiling
each contender are counted (``graph_breaks``). ``--ort`` (CPU, fp32 inference) adds ONNX Runtime running ours as
``scripts/export.py`` writes it, with the same thread count, in the same interleaved rounds; its logits are
compared with ours eager (``max_abs_diff_vs_ours_eager``).

``--keep-freed-memory`` (CPU) sets glibc's malloc for the whole process as ``main.py --eval`` does for ours
(``utils.misc.keep_freed_cpu_memory``), for every contender alike: freed blocks are reused instead of coming
back as fresh pages, so the ratios measure the computation and not which contender's allocations happened to
fault in this process's heap (the ``malloc`` column says which setting a row ran under).

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
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import SwinTransformer, fast_paths  # noqa: E402
from models.convert import timm_to_official  # noqa: E402
from utils.misc import keep_freed_cpu_memory  # noqa: E402

VARIANTS = {  # name: (timm name, torchvision name, our kwargs)
    'tiny': ('swin_tiny_patch4_window7_224', 'swin_t', dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    # a Swin-T with narrow stages for smoke runs and tests (seconds): timm's Swin-T and torchvision's
    # SwinTransformer with the same widths (torchvision's swin_t fixes them, so its class is built instead)
    'micro': ('swin_tiny_patch4_window7_224', '', dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))),
    'small': ('swin_small_patch4_window7_224', 'swin_s', dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
    'base': ('swin_base_patch4_window7_224', 'swin_b', dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))),
}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
IMPLS = ('ours', 'timm', 'torchvision')
FAST_PATH_CHOICES = ('measure', 'all', 'none')


def dtype_runs_on(dtype_name: str, device: torch.device) -> bool:
    """Whether the benchmark times ``dtype_name`` on ``device`` (fp16 only on CUDA)."""
    return dtype_name != 'fp16' or device.type == 'cuda'


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
        out['timm'] = timm.create_model(timm_name, pretrained=False, **({} if tv_name else kwargs))
    if 'ours' in wanted:
        out['ours'] = SwinTransformer(img_size=224, window_size=7, drop_path_rate=0.0, **kwargs)
        if 'timm' in out:
            out['ours'].load_state_dict(timm_to_official(out['timm'].state_dict()))
    if 'torchvision' in wanted:
        tv = getattr(torchvision.models, tv_name)() if tv_name else torchvision.models.SwinTransformer(
            patch_size=[4, 4], window_size=[7, 7], embed_dim=kwargs['embed_dim'], depths=list(kwargs['depths']),
            num_heads=list(kwargs['num_heads']))
        for m in tv.modules():  # same regularisation as the others: no stochastic depth
            if isinstance(m, torchvision.ops.StochasticDepth):
                m.p = 0.0
        out['torchvision'] = tv
    return {name: out[name].to(device) for name in IMPLS if name in out}


def make_step(model: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device,
              x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """A closure running one inference batch (returns the logits) or one train step (forward, backward, AdamW)."""
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    if mode == 'infer':
        model.eval()

        def step() -> torch.Tensor:
            with torch.inference_mode(), autocast:
                return model(x)
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
           '--threads', str(args.threads), '--device', 'cpu', '--fast-paths', args.fast_paths]
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
    if args._memory_probe == 'ours':  # the paths of the timed run (from the cache it filled, when measured)
        choose_fast_paths(model, args.fast_paths, args.modes, DTYPES[args.dtypes[0]], device, args.batch_size)
    x = torch.randn(args.batch_size, 3, 224, 224)
    target = torch.randint(0, 1000, (args.batch_size,))
    step = make_step(model, args.modes[0], DTYPES[args.dtypes[0]], device, x, target)
    base = _proc_status_mb('VmRSS')
    for _ in range(2):  # the second step has optimizer state and gradients from the first
        step()
    print(json.dumps({'peak_mb': _proc_status_mb('VmHWM') - base}))


@contextmanager
def environment_without(name: str) -> Iterator[None]:
    """``os.environ`` without ``name`` inside the block (as it was after)."""
    previous = os.environ.pop(name, None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ[name] = previous


def choose_fast_paths(model: torch.nn.Module, how: str, bench_modes: Sequence[str], dtype: torch.dtype,
                      device: torch.device, batch_size: int) -> Dict[str, Dict[str, bool]]:
    """Apply (process-wide) and return the named fast paths ``main.py`` would run ours with: ``engine.
    select_fast_paths`` itself, on a config of this model, batch and image size, with ``MODEL.FAST_PATHS_SELECT
    how``; the modes a training run measures (train and eval) when the benchmark times training, else those of
    ``main.py --eval`` (eval). ``how`` wins over ``SWIN_FAST_PATHS_SELECT`` (the benchmark's flag says it)."""
    import logging

    import engine
    from config import get_defaults
    config = get_defaults()
    config.defrost()
    config.MODEL.TYPE = 'swin'
    config.MODEL.FAST_PATHS_SELECT = how
    config.DATA.BATCH_SIZE = batch_size
    config.DATA.IMG_SIZE = 224
    config.freeze()
    log = logging.getLogger('benchmark')
    if not log.handlers:  # select_fast_paths logs its choice (and on a miss the measured ratios) once: show it
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(message)s'))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    modes = ('train', 'eval') if 'train' in bench_modes else ('eval',)
    precision = engine.Precision(device, None if dtype == torch.float32 else dtype)
    with environment_without(engine.SELECT_ENV_VAR):
        return engine.select_fast_paths(config, model, precision, log, modes=modes)


def paths_off(choices: Dict[str, Dict[str, bool]], mode: str) -> str:
    """The ``fast_paths`` column: the named paths off for a benchmark ``mode`` (infer: eval's choices)."""
    off = [name for name, on in choices['eval' if mode == 'infer' else 'train'].items() if not on]
    return 'off: ' + (' '.join(off) if off else 'none')


def graph_breaks_so_far() -> int:
    """Graph breaks dynamo met in this process so far (its own counter; ``torch._dynamo.explain`` would trace every
    contender once more just to count them)."""
    from torch._dynamo.utils import counters
    return sum(counters['graph_break'].values())


def make_ort_step(model: torch.nn.Module, x: torch.Tensor, threads: int, folder: str
                  ) -> Callable[[], object]:
    """One fp32 inference batch of ``model`` exported as ``scripts/export.py`` exports it (its ``export_onnx``) and
    run by an onnxruntime ``InferenceSession`` on the CPU with ``threads`` intra-op threads (returns the logits)."""
    import onnxruntime as ort

    from scripts.export import export_onnx
    path = os.path.join(folder, 'ours.onnx')
    was_training = model.training
    model.eval()
    export_onnx(model, path, tuple(x.shape[-2:]), in_chans=x.shape[1])
    model.train(was_training)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {'images': x.detach().cpu().numpy()}

    def step() -> torch.Tensor:
        return torch.from_numpy(session.run(['logits'], feed)[0])
    return step


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.ort:
        if device.type != 'cpu':
            raise SystemExit('--ort runs ONNX Runtime on the CPU: use it with --device cpu')
        if 'ours' not in args.impls:
            raise SystemExit('--ort runs ours exported to ONNX: keep ours among --impls')
    if args.keep_freed_memory and device.type != 'cpu':
        raise SystemExit('--keep-freed-memory sets the CPU allocator: use it with --device cpu')
    if args.keep_freed_memory and not keep_freed_cpu_memory():
        raise SystemExit('--keep-freed-memory needs Linux with glibc (mallopt)')
    malloc = 'n/a' if device.type != 'cpu' else 'freed blocks kept' if args.keep_freed_memory else 'default'
    contenders = build_contenders(args.model, device, impls=args.impls)
    # Ours' fast paths for every dtype, chosen before anything runs (as main.py chooses them at the start of a
    # fresh process): measured after other rows had run, the heap they left moved the plain MLP of bf16 Swin-T
    # training from 0.95x of all on (measured first) to 0.99x (measured after the fp32 rows; Intel Xeon with AMX).
    selected = {name: choose_fast_paths(contenders['ours'], args.fast_paths, args.modes, DTYPES[name], device,
                                        args.batch_size)
                for name in args.dtypes if 'ours' in contenders and dtype_runs_on(name, device)}
    iters = args.iters or (10 if device.type == 'cuda' else 1)
    warmup = max(args.warmup, 1) if args.compile else args.warmup  # compile time is the first calls'
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    diffs = {}
    eager_ours = None
    if 'timm' in contenders or 'ours' in contenders:
        with torch.no_grad():
            if 'ours' in contenders:
                eager_ours = contenders['ours'].eval()(x).float()
            if 'timm' in contenders:
                ref = contenders['timm'].eval()(x)
                diffs = {n: (m.eval()(x) - ref).abs().max().item() for n, m in contenders.items()
                         if n != 'torchvision'}
    ort_folder = tempfile.TemporaryDirectory(prefix='bench_ort_') if args.ort else None
    rows = []
    for mode in args.modes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            if not dtype_runs_on(dtype_name, device):
                print(f'skip {dtype_name} on {device.type}')
                continue
            choices = selected.get(dtype_name)
            if choices is not None:  # applied before anything runs ours in this dtype (the flop count included)
                fast_paths.set_fast_path_choices(choices)
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
                    model = torch.compile(model, backend=args.compile_backend)
                steps[name] = make_step(model, mode, dtype, device, x, target)
            if ort_folder is not None and mode == 'infer' and dtype == torch.float32:
                steps['ort'] = make_ort_step(contenders['ours'], x, args.threads, ort_folder.name)
            first_calls = {n: 0.0 for n in steps}
            breaks = {n: 0 for n in steps}
            for _ in range(warmup):
                for name, step in steps.items():
                    before = graph_breaks_so_far() if args.compile else 0
                    sync(device)
                    start = time.perf_counter()
                    step()
                    sync(device)
                    first_calls[name] += time.perf_counter() - start
                    if args.compile:
                        breaks[name] += graph_breaks_so_far() - before
            sync(device)
            times: Dict[str, List[float]] = {n: [] for n in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    times[name].append(time_per_call(step, device, iters))
            vs_eager = {}
            if mode == 'infer' and dtype == torch.float32 and eager_ours is not None:
                for name in ('ours', 'ort') if args.compile else ('ort',):
                    if name in steps:
                        vs_eager[name] = (steps[name]().float() - eager_ours).abs().max().item()
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
            # the peers are timm and torchvision; ORT runs ours (exported), so it is compared with them too
            peers = [r['img_s'] for name, r in result.items() if name not in ('ours', 'ort')]
            best_peer = max(peers) if peers else float('nan')
            for name, r in result.items():
                compiled = args.compile and name != 'ort'
                rows.append(dict(mode=mode, dtype=dtype_name, impl=name, batch=args.batch_size, device=device.type,
                                 threads=args.threads, compile=compiled, img_s=round(r['img_s'], 2),
                                 ms_median=round(r['ms'], 1), ratio_vs_best_peer=round(r['img_s'] / best_peer, 3),
                                 peak_mb=round(r['peak_mb'], 1), roofline_frac=round(r['roofline'], 3),
                                 matmul_tflops=round(roof / 1e12, 3),
                                 max_abs_diff_vs_timm=f"{diffs[name]:.1e}" if name in diffs else 'n/a',
                                 fast_paths=paths_off(choices, mode) if name in ('ours', 'ort') and choices else 'n/a',
                                 compile_s=round(max(first_calls[name] - warmup * r['ms'] / 1e3, 0.0), 2)
                                 if compiled else 'n/a',
                                 graph_breaks=breaks[name] if compiled else 'n/a',
                                 max_abs_diff_vs_ours_eager=f"{vs_eager[name]:.1e}" if name in vs_eager else 'n/a',
                                 malloc=malloc))
                print(json.dumps(rows[-1]), flush=True)
            if 'ort' in result:
                fastest = max((r for n, r in result.items() if n != 'ort'), key=lambda r: r['img_s'])
                verdict = 'beats' if result['ort']['img_s'] > fastest['img_s'] else 'does not beat'
                print(f"ONNX Runtime {verdict} every PyTorch contender here: {result['ort']['img_s']:.2f} img/s "
                      f"vs {fastest['img_s']:.2f}", flush=True)
    if ort_folder is not None:
        ort_folder.cleanup()
    return rows


def write_tables(rows: List[dict], out_prefix: str) -> None:
    with open(out_prefix + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = ['mode', 'dtype', 'impl', 'compile', 'img_s', 'ratio_vs_best_peer', 'ms_median', 'peak_mb',
            'roofline_frac', 'max_abs_diff_vs_timm', 'fast_paths', 'compile_s', 'graph_breaks',
            'max_abs_diff_vs_ours_eager', 'malloc']
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
    p.add_argument('--fast-paths', choices=FAST_PATH_CHOICES, default=None,
                   help="ours' named fast paths: measure = as main.py chooses them (engine.select_fast_paths, "
                        "cached), all = every one on, none = every one off (default: SWIN_FAST_PATHS_SELECT if "
                        "set, as for main.py, else measure)")
    p.add_argument('--compile', action='store_true',
                   help='torch.compile every contender (compile time and graph breaks reported apart)')
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile's backend (default: inductor; eager or aot_eager trace without code generation)")
    p.add_argument('--ort', action='store_true',
                   help='CPU fp32 inference: add ONNX Runtime running ours as scripts/export.py exports it')
    p.add_argument('--cpu-memory', action='store_true',
                   help='on CPU, measure the peak memory of a train step in a subprocess per contender')
    p.add_argument('--keep-freed-memory', action='store_true',
                   help="CPU: glibc's malloc keeps freed blocks for every contender (as main.py --eval does for ours)")
    p.add_argument('--out', default='', help='write <out>.csv and <out>.md')
    p.add_argument('--_memory-probe', dest='_memory_probe', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fast_paths is None:
        from engine import SELECT_ENV_VAR  # here, not at the top: --help stays instant
        args.fast_paths = os.environ.get(SELECT_ENV_VAR) or 'measure'
        if args.fast_paths not in FAST_PATH_CHOICES:
            p.error(f"environment variable {SELECT_ENV_VAR}={args.fast_paths!r} must be one of "
                    f"{', '.join(FAST_PATH_CHOICES)} (or unset)")
    return args


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
