"""The benchmark harness runs end to end and reports what it promises (tiny settings)."""
import os
import subprocess
import sys

import pytest
import torch

from scripts.benchmark import parse_args, run, write_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_and_writes_tables(tmp_path):
    args = parse_args(['--batch-size', '1', '--modes', 'infer', '--dtypes', 'fp32', '--warmup', '0',
                       '--rounds', '1', '--threads', '1'])
    rows = run(args)
    assert {r['impl'] for r in rows} == {'ours', 'timm', 'torchvision'}
    ours = next(r for r in rows if r['impl'] == 'ours')
    assert ours['img_s'] > 0 and ours['roofline_frac'] > 0
    peers = max(r['img_s'] for r in rows if r['impl'] != 'ours')
    assert ours['ratio_vs_best_peer'] == pytest.approx(ours['img_s'] / peers, abs=2e-3)
    assert ours['ms_median'] == pytest.approx(1000 / ours['img_s'], rel=2e-3, abs=0.06)  # batch 1
    # the roofline fraction is achieved FLOP/s over the matmul peak: per image that is Swin-T's official
    # 4.494 GMACs at 2 FLOPs each (torch's counter), give or take the rounding of the three printed figures
    low = (ours['roofline_frac'] - 5e-4) * (ours['matmul_tflops'] - 5e-4) * 1e12 / (ours['img_s'] + 5e-3)
    high = (ours['roofline_frac'] + 5e-4) * (ours['matmul_tflops'] + 5e-4) * 1e12 / (ours['img_s'] - 5e-3)
    assert low < 1.04 * 2 * 4.494e9 and high > 0.98 * 2 * 4.494e9, (low, high)
    assert float(ours['max_abs_diff_vs_timm']) < 1e-4  # same weights, same logits
    write_tables(rows, str(tmp_path / 'bench'))
    assert (tmp_path / 'bench.md').read_text().count('\n') == 5


def test_benchmark_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and '--compile' in out.stdout


def test_benchmark_of_chosen_contenders(tmp_path):
    """--impls: ours against torchvision alone (ours keeps its own init: no timm weights, no logit diff)."""
    args = parse_args(['--batch-size', '1', '--modes', 'train', '--dtypes', 'fp32', '--warmup', '0', '--rounds', '1',
                       '--iters', '2', '--threads', '1', '--impls', 'ours', 'torchvision'])
    rows = run(args)
    assert [r['impl'] for r in rows] == ['ours', 'torchvision']
    ours = rows[0]
    assert ours['img_s'] > 0 and ours['ratio_vs_best_peer'] == pytest.approx(ours['img_s'] / rows[1]['img_s'], rel=0.01)
    assert ours['max_abs_diff_vs_timm'] == 'n/a'


def test_cuda_steps_are_timed_between_events_without_host_syncs(monkeypatch):
    """On CUDA a round is ``iters`` steps between two CUDA events and one sync after them (fault 7: one
    host-timed step between syncs measured launch latency)."""
    from scripts import benchmark
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            log.append('record')
            self.at = len(log)

        def synchronize(self):
            log.append('sync')

        def elapsed_time(self, other):
            return 40.0 * (other.at - self.at - 1)  # 40 ms per step between the two events

    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: log.append('sync'))
    seconds = benchmark.time_per_call(lambda: log.append('step'), torch.device('cuda'), 5)
    assert log == ['record'] + ['step'] * 5 + ['record', 'sync']
    assert seconds == pytest.approx(0.040)


@pytest.mark.fake_cuda
def test_peak_memory_counts_the_contenders_own_state_only():
    """The memory of a contender is its weights, buffers and optimizer state plus its step's peak on top, never
    the other contenders' (fault 7: they all live in one process). Checked on fake CUDA tensors."""
    from fake_cuda import fake_cuda, on_fake_cuda

    from scripts import benchmark
    with fake_cuda():
        ours = on_fake_cuda(lambda: torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)))
        other = on_fake_cuda(lambda: torch.nn.Linear(64, 64))
        x, target = torch.empty(2, 8, device='cuda'), torch.zeros(2, dtype=torch.int64, device='cuda')
        step = benchmark.make_step(ours, 'train', torch.float32, torch.device('cuda'), x, target)
        step()
        params = sum(p.numel() * 4 for p in ours.parameters())
        assert benchmark.own_bytes(ours) == params
        assert benchmark.own_bytes(ours, step.optimizer) == 3 * params  # + AdamW's two moments
        assert benchmark.own_bytes(other) == 65 * 64 * 4


def test_gpu_check_runs_every_step_when_one_fails(tmp_path):
    """scripts/gpu_check.sh with a failing stand-in for the demo: every later step still runs, the summary table
    lists them all, and the exit status is 1."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN='1', GPU_CHECK_FAIL='demo', GPU_CHECK_OUT=str(tmp_path))
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh')], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith('| ') and not line.startswith('| step')]
    status = {row.split('|')[1].strip(): row.split('|')[2].strip() for row in rows}
    assert status == {'gpu_tests': 'ok', 'demo': 'FAIL (exit 1)', 'bench_eager': 'ok', 'bench_compiled': 'ok',
                      'bench_data': 'ok'}
    assert out.stdout.count('| step | status | seconds |') == 1
    assert (tmp_path / 'summary.md').read_text().count('| demo | FAIL') == 1
    ok = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh')], capture_output=True, text=True,
                        env=dict(env, GPU_CHECK_FAIL=''), timeout=60)
    assert ok.returncode == 0 and 'FAIL' not in ok.stdout
