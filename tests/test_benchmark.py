"""The benchmark harness runs end to end and reports what it promises (tiny settings)."""
import json
import logging
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
    assert out.returncode == 0 and all(f in out.stdout for f in ('--compile', '--fast-paths', '--ort'))


def test_benchmark_of_chosen_contenders(tmp_path):
    """--impls: ours against torchvision alone (ours keeps its own init: no timm weights, no logit diff)."""
    args = parse_args(['--batch-size', '1', '--modes', 'train', '--dtypes', 'fp32', '--warmup', '0', '--rounds', '1',
                       '--iters', '2', '--threads', '1', '--impls', 'ours', 'torchvision'])
    rows = run(args)
    assert [r['impl'] for r in rows] == ['ours', 'torchvision']
    ours = rows[0]
    assert ours['img_s'] > 0 and ours['ratio_vs_best_peer'] == pytest.approx(ours['img_s'] / rows[1]['img_s'], rel=0.01)
    assert ours['max_abs_diff_vs_timm'] == 'n/a'


MICRO = ['--model', 'micro', '--batch-size', '1', '--modes', 'infer', '--dtypes', 'fp32', '--warmup', '1',
         '--rounds', '1', '--threads', '1']


def test_ours_runs_with_the_fast_paths_main_would_choose(capsys):
    """--fast-paths measure: engine.select_fast_paths measures once (into the session's cache), a second run reads
    the cache; the rows say what is off and the process runs with that choice. none and all pin them."""
    from models import fast_paths
    # the script's log handler writes to the sys.stdout of its first use (an earlier test's capture): start anew
    logging.getLogger('benchmark').handlers.clear()
    rows = run(parse_args(MICRO + ['--fast-paths', 'measure', '--impls', 'ours']))
    first = capsys.readouterr().out
    assert 'fast paths (measured in' in first
    chosen = fast_paths.get_fast_path_choices()
    off = [name for name, on in chosen['eval'].items() if not on]
    assert rows[0]['fast_paths'] == 'off: ' + (' '.join(off) or 'none')
    fast_paths.set_fast_path_choices(fast_paths.all_on())
    run(parse_args(MICRO + ['--fast-paths', 'measure', '--impls', 'ours']))
    assert 'fast paths (cached in' in capsys.readouterr().out
    assert fast_paths.get_fast_path_choices() == chosen
    (none,) = run(parse_args(MICRO + ['--fast-paths', 'none', '--impls', 'ours']))
    assert none['fast_paths'] == 'off: ' + ' '.join(fast_paths.PATHS)
    (every,) = run(parse_args(MICRO + ['--fast-paths', 'all', '--impls', 'ours']))
    assert every['fast_paths'] == 'off: none' and fast_paths.get_fast_path_choices() == fast_paths.all_on()
    # without the flag the default follows SWIN_FAST_PATHS_SELECT as main.py does (the suite sets it to all)
    assert parse_args(MICRO).fast_paths == os.environ.get('SWIN_FAST_PATHS_SELECT', 'measure')


def test_fast_paths_are_chosen_for_every_dtype_before_anything_is_timed(monkeypatch):
    """As main.py chooses them at the start of a fresh process: every dtype's choice is made before the first
    step is built, and each dtype's rows run with their own."""
    import scripts.benchmark as benchmark
    from models import fast_paths
    events = []
    picks = {torch.float32: {'eval': {'sdpa': False}}, torch.bfloat16: {'eval': {'chunked_mlp': False}}}

    def choose(model, how, modes, dtype, device, batch):
        events.append(('choose', dtype))
        choices = fast_paths.check_choices(picks[dtype])
        fast_paths.set_fast_path_choices(choices)
        return choices
    make_step = benchmark.make_step

    def step(model, mode, dtype, *args):
        events.append(('step', dtype, tuple(n for n, on in fast_paths.get_fast_path_choices()['eval'].items()
                                            if not on)))
        return make_step(model, mode, dtype, *args)
    monkeypatch.setattr(benchmark, 'choose_fast_paths', choose)
    monkeypatch.setattr(benchmark, 'make_step', step)
    try:
        rows = run(parse_args(MICRO[:MICRO.index('--dtypes') + 1] + ['fp32', 'bf16'] +
                              MICRO[MICRO.index('--dtypes') + 2:] + ['--impls', 'ours']))
    finally:
        fast_paths.set_fast_path_choices(fast_paths.all_on())
    assert events[:2] == [('choose', torch.float32), ('choose', torch.bfloat16)]
    assert events[2:] == [('step', torch.float32, ('sdpa',)), ('step', torch.bfloat16, ('chunked_mlp',))]
    assert [r['fast_paths'] for r in rows] == ['off: sdpa', 'off: chunked_mlp']


def test_graph_breaks_are_counted():
    """The graph_breaks column's counter sees a break dynamo takes (one here)."""
    from scripts.benchmark import graph_breaks_so_far

    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2
    before = graph_breaks_so_far()
    assert torch.equal(torch.compile(broken, backend='eager')(torch.ones(3)), torch.full((3,), 4.0))
    assert graph_breaks_so_far() - before == 1


def test_compiled_contenders_report_compile_time_and_graph_breaks():
    """--compile: per compiled contender the compile time (first calls less steady steps) and its graph breaks;
    ours compiles whole (no break) and its compiled logits match eager (dynamo's eager backend: no codegen, fast)."""
    torch._dynamo.reset()
    rows = run(parse_args(MICRO + ['--compile', '--compile-backend', 'eager', '--impls', 'ours', 'timm',
                                   '--fast-paths', 'all']))
    assert [r['impl'] for r in rows] == ['ours', 'timm']
    for r in rows:
        assert r['compile'] is True and isinstance(r['compile_s'], float) and r['compile_s'] >= 0
        assert isinstance(r['graph_breaks'], int)
    assert rows[0]['graph_breaks'] == 0
    assert float(rows[0]['max_abs_diff_vs_ours_eager']) < 1e-4


def test_onnx_runtime_contender(tmp_path):
    """--ort: ours exported as scripts/export.py exports it, run by onnxruntime in the same rounds (fp32
    inference only), its logits close to ours eager; a CUDA device or no ours is refused early."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    rows = run(parse_args(MICRO + ['--ort', '--impls', 'ours', 'timm', '--fast-paths', 'all', '--modes', 'infer',
                                   'train']))
    assert [(r['mode'], r['impl']) for r in rows] == [('infer', 'ours'), ('infer', 'timm'), ('infer', 'ort'),
                                                      ('train', 'ours'), ('train', 'timm')]
    ort_row = rows[2]
    assert ort_row['img_s'] > 0 and ort_row['compile'] is False and ort_row['fast_paths'] == 'off: none'
    assert float(ort_row['max_abs_diff_vs_ours_eager']) < 1e-4
    assert ort_row['ratio_vs_best_peer'] == pytest.approx(ort_row['img_s'] / rows[1]['img_s'], rel=0.01)
    with pytest.raises(SystemExit, match='--device cpu'):
        run(parse_args(MICRO + ['--ort', '--device', 'cuda']))
    with pytest.raises(SystemExit, match='keep ours'):
        run(parse_args(MICRO + ['--ort', '--impls', 'timm']))


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


def test_end_to_end_benchmark_gives_both_tools_the_same_model_and_recipe():
    """scripts/benchmark_e2e.py: main.py's --opts and timm train.py's flags describe one architecture (ours
    takes timm's weights strictly) and one recipe (lr after the linear scaling rule, epochs, batch)."""
    import ast

    import timm

    from config import load_config
    from models import build_model
    from models.convert import timm_to_official
    from scripts import benchmark_e2e

    ours = benchmark_e2e.ours_command('/data', '/out', 'small', 6)
    opts = ours[ours.index('--opts') + 1:]
    config = load_config(opts=opts)
    theirs = benchmark_e2e.timm_command('train.py', '/data', '/out', 'small', 6)
    flag = lambda name: theirs[theirs.index(name) + 1]  # noqa: E731
    kwargs = {}
    for item in theirs[theirs.index('--model-kwargs') + 1:theirs.index('--img-size')]:
        key, value = item.split('=', 1)
        kwargs[key] = ast.literal_eval(value)
    timm_model = timm.create_model(flag('--model'), num_classes=int(flag('--num-classes')), **kwargs)
    our_model = build_model(config)
    our_model.load_state_dict(timm_to_official(timm_model.state_dict()), strict=True)
    assert sum(p.numel() for p in our_model.parameters()) == sum(p.numel() for p in timm_model.parameters())
    batch = int(ours[ours.index('--batch-size') + 1])
    assert int(flag('-b')) == batch and int(flag('--epochs')) == config.TRAIN.EPOCHS == 6
    assert int(flag('--img-size')) == config.DATA.IMG_SIZE == 64
    assert float(flag('--lr')) == pytest.approx(config.TRAIN.BASE_LR * batch / 512)
    assert float(flag('--drop-path')) == config.MODEL.DROP_PATH_RATE
    assert float(flag('--mixup')) == config.AUG.MIXUP and float(flag('--cutmix')) == config.AUG.CUTMIX
    assert float(flag('--smoothing')) == config.MODEL.LABEL_SMOOTHING
    assert float(flag('--reprob')) == config.AUG.REPROB and flag('--aa') == config.AUG.AUTO_AUGMENT
    assert float(flag('--clip-grad')) == config.TRAIN.CLIP_GRAD


def test_the_cpu_allocator_setting_is_applied_to_the_whole_run_and_reported():
    # a fresh process: the setting is process-wide and cannot be undone
    base = [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--model', 'micro', '--batch-size', '1',
            '--modes', 'infer', '--dtypes', 'fp32', '--warmup', '0', '--rounds', '1', '--threads', '1',
            '--impls', 'ours', 'timm', '--fast-paths', 'all']
    for flag, expected in (([], 'default'), (['--keep-freed-memory'], 'freed blocks kept')):
        out = subprocess.run(base + flag, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
        assert {r['impl'] for r in rows} == {'ours', 'timm'} and {r['malloc'] for r in rows} == {expected}
    gpu = subprocess.run(base[:2] + ['--keep-freed-memory', '--device', 'cuda'], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert gpu.returncode != 0 and '--device cpu' in gpu.stderr
