"""The named fast paths and their selection (models/fast_paths.py, models/fast_path_select.py,
engine.select_fast_paths, utils/fast_path_cache.py): each path forced on alone gives the plain path's outputs and
is the only one taken; measurement follows the timer; a resumed run takes the recorded choice; the master switch
turns every path off whatever the selection."""
import json
import os
import sys

import pytest
import torch

import engine
import models.fast_path_select as fast_path_select
import models.fast_paths as fast_paths
import models.lowp as lowp
import test_fast_paths
import test_models
from config import ConfigError, load_config
from models import SwinTransformer, SwinTransformerV2
from models.fast_paths import PATHS, fast_path_choices, fast_paths_enabled, use_fast_path
from utils import fast_path_cache

SMALL = test_models.SMALL
BF16 = torch.bfloat16

# The spies of test_fast_paths.spy_on_fast_paths that belong to each named path (the rest are structural).
SPIES = {
    'lowp_matmul': ('upcast linear (grad)', 'upcast operands'),
    'chunked_mlp': ('chunked MLP (grad)', 'chunked MLP forward'),
    'contiguous_heads': ('contiguous heads',),
    'sdpa': ('SDPA',),
    'recompute_attn_input': ('recomputed attention input',),
    'permute_backward': ('permutation backward',),
    'onednn_linear': ('oneDNN linear (grad)', 'oneDNN linear'),
}


def only(name):
    """Choices with ``name`` alone on, in both modes."""
    return {mode: {p: p == name for p in PATHS} for mode in fast_paths.MODES}


NONE = {mode: dict.fromkeys(PATHS, False) for mode in fast_paths.MODES}


# ----------------------------------------------------------------------------- forcing each path alone
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2], ids=['v1', 'v2'])
def test_each_path_alone_equals_the_plain_path_and_is_the_only_one_taken(monkeypatch, cls):
    """Each named path on by itself (the others off, the master switch on): forward, inference and gradients
    equal the official computation (switch off) at test_fast_paths' tolerances, fp32 and bf16 autocast, and of
    the named paths' code only its own runs. With no path chosen, none of their code runs."""
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: False)  # the upcast path exists on any CPU
    model = test_models.randomize(cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    x = torch.randn(2, 3, 32, 32)  # 8x8 tokens: shifted windows of 4, no padding (the permutation path)
    calls = test_fast_paths.spy_on_fast_paths(monkeypatch)
    dtypes = (torch.float32, BF16)
    with fast_paths_enabled(False):
        plain = {dtype: test_fast_paths.run_model(model, x, dtype) for dtype in dtypes}
    owned = {key for keys in SPIES.values() for key in keys}
    for name in PATHS + ('none',):
        for key in calls:
            calls[key] = 0
        with fast_paths_enabled(True), fast_path_choices(NONE if name == 'none' else only(name)):
            forced = {dtype: test_fast_paths.run_model(model, x, dtype) for dtype in dtypes}
        taken = {key for key in owned if calls[key]}
        expected = set() if name == 'none' else set(SPIES[name])
        if name == 'recompute_attn_input' and cls is SwinTransformerV2:
            expected = set()  # V1 only (V2's post-norm block recomputes nothing)
        assert taken == expected, f'{name} alone: named-path code taken {sorted(taken)}, expected {sorted(expected)}'
        for dtype in dtypes:
            (out, infer, grad), (out0, infer0, grad0) = forced[dtype], plain[dtype]
            if dtype == torch.float32:
                assert (out - out0).abs().max().item() < 1e-5, name
                assert (infer - infer0).abs().max().item() < 1e-5, name
                test_fast_paths.assert_close_gradients(grad, grad0)
            else:  # test_fast_paths' bf16 tolerances: within bf16 precision of fp32, gradients within 5%
                fp32_out, fp32_infer, _ = plain[torch.float32]
                scale = fp32_out.abs().max().item()
                assert (out - fp32_out).abs().max().item() < 0.03 * scale, name
                assert (infer - fp32_infer).abs().max().item() < 0.03 * scale, name
                assert (grad - grad0).norm() < 0.05 * grad0.norm(), name


def test_master_switch_turns_every_path_off_whatever_the_choices(monkeypatch):
    with fast_path_choices(fast_paths.all_on()):
        with fast_paths_enabled(False):
            assert not any(use_fast_path(n, m) for n in PATHS for m in fast_paths.MODES)
            assert not fast_paths.use_eager_fast_path('chunked_mlp')
            assert not lowp.upcast_dtype(BF16, torch.device('cpu'))
        with fast_paths_enabled(True):
            assert all(use_fast_path(n, m) for n in PATHS for m in fast_paths.MODES)
    with fast_paths_enabled(True), fast_path_choices({'train': {'sdpa': False}}):
        assert not use_fast_path('sdpa', 'train') and use_fast_path('sdpa', 'eval')
        with torch.no_grad():
            assert use_fast_path('sdpa')  # the mode follows grad mode
        assert not use_fast_path('sdpa')
    with pytest.raises(ValueError, match='unknown path'):
        fast_paths.set_fast_path_choices({'train': {'fused_everything': True}})
    with pytest.raises(ValueError, match='unknown mode'):
        fast_paths.set_fast_path_choices({'inference': {}})


# ----------------------------------------------------------------------------- measuring
class FakeTimer:
    """A clock that advances by ``cost`` per reading while ``path`` is chosen for ``mode`` and by 1 otherwise:
    the unit timed between two readings costs ``cost`` with the path and 1 without it."""

    def __init__(self, path: str, mode: str, cost: float):
        self.path, self.mode, self.cost, self.now, self.readings = path, mode, cost, 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        if self.readings % 2 == 0:  # the end of a timed unit: charge it
            on = fast_paths.get_fast_path_choices()[self.mode][self.path]
            self.now += self.cost if on else 1.0
        return self.now


def tiny_model():
    return SwinTransformer(img_size=32, window_size=4, num_classes=4, drop_path_rate=0.1, embed_dim=16,
                           depths=(2, 2), num_heads=(1, 2))


def test_measurement_follows_the_timer_and_leaves_the_model_and_rng_alone():
    model = tiny_model()
    x = torch.randn(4, 3, 32, 32)
    samples = fast_path_select.capture_blocks(model, lambda: model(x))
    assert [s.weight for s in samples] == [2, 2] and all(any(s.block.shift_size) for s in samples[:1])
    model.train()
    rng = torch.get_rng_state()
    with fast_paths_enabled(True):
        choices, timings = fast_path_select.measure_choices(model, samples, None, torch.device('cpu'),
                                                            timer=FakeTimer('chunked_mlp', 'train', 1.5))
        assert choices['train']['chunked_mlp'] is False  # the plain MLP took 1 against 1.5: chosen off
        assert all(on for mode, paths in choices.items() for name, on in paths.items()
                   if (mode, name) != ('train', 'chunked_mlp'))
        assert timings['train']['no chunked_mlp'] < timings['train']['all on']
        choices, _ = fast_path_select.measure_choices(model, samples, None, torch.device('cpu'),
                                                      timer=FakeTimer('sdpa', 'eval', 1.01))
        assert all(on for paths in choices.values() for on in paths.values())  # inside MARGIN: kept on
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert fast_path_select.applicable_paths('train', None, torch.device('cuda')) == []  # CUDA: nothing timed


def model_with_recorded_forward():
    """The tiny model, its captured blocks, a forward of a sample batch, and the list where each call of that
    forward records (training mode, grad enabled)."""
    model = tiny_model()
    x = torch.randn(4, 3, 32, 32)
    samples = fast_path_select.capture_blocks(model, lambda: model(x))
    calls = []

    def forward():
        calls.append((model.training, torch.is_grad_enabled()))
        return model(x)

    return model, samples, forward, calls


def test_evaluation_is_timed_on_whole_forwards_when_one_is_given():
    model, samples, forward, calls = model_with_recorded_forward()
    with fast_paths_enabled(True):
        choices, timings = fast_path_select.measure_choices(model, samples, None, torch.device('cpu'),
                                                            modes=['eval'], timer=FakeTimer('sdpa', 'eval', 1.5),
                                                            forward=forward)
    assert choices['eval']['sdpa'] is False and timings['eval']['no sdpa'] < timings['eval']['all on']
    # every timed unit of evaluation was one forward, in eval mode without gradients (at least one per variant
    # timed: all on, each path off, the chosen set and all on again)
    assert set(calls) == {(False, False)} and len(calls) >= len(timings['eval'])


class SetTimer:
    """A clock charging each timed unit by which of ``costs``' paths are off in ``mode`` (a frozenset of names ->
    cost; any other set costs 1)."""

    def __init__(self, mode: str, costs: dict):
        self.mode, self.costs, self.now, self.readings = mode, costs, 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        if self.readings % 2 == 0:
            off = frozenset(n for n, on in fast_paths.get_fast_path_choices()[self.mode].items() if not on)
            self.now += self.costs.get(off, 1.0)
        return self.now


def test_training_is_timed_on_whole_steps_and_a_failed_set_falls_back_to_the_best_path_alone():
    """With ``forward`` training is timed on whole forward + backward steps of the model in training mode; two
    paths that each save time alone but cost time together: the one that saved the most is timed alone again
    and chosen off; the gradients are as before."""
    model, samples, forward, calls = model_with_recorded_forward()
    a, b = 'chunked_mlp', 'permute_backward'
    costs = {frozenset([a]): 0.8, frozenset([b]): 0.9, frozenset([a, b]): 1.2}
    with fast_paths_enabled(True):
        choices, timings = fast_path_select.measure_choices(model, samples, None, torch.device('cpu'),
                                                            modes=['train'], timer=SetTimer('train', costs),
                                                            forward=forward)
    assert [n for n, on in choices['train'].items() if not on] == [a]
    assert timings['train']['chosen, timed together'] > timings['train']['all on, timed again']
    assert timings['train']['best alone, timed together'] < timings['train']['all on, timed again (best alone)']
    assert set(calls) == {(True, True)} and all(p.grad is None for p in model.parameters())
    with fast_paths_enabled(True):  # both off together is the fastest: no fallback timed
        choices, timings = fast_path_select.measure_choices(
            model, samples, None, torch.device('cpu'), modes=['train'], forward=forward,
            timer=SetTimer('train', {**costs, frozenset([a, b]): 0.7}))
    assert sorted(n for n, on in choices['train'].items() if not on) == sorted([a, b])
    assert 'best alone, timed together' not in timings['train']


def test_the_together_check_keeps_a_set_faster_than_all_on_by_less_than_the_margin(monkeypatch):
    """The margin decides which paths to try off; the check of them together then only asks for a faster step:
    a set faster by two thirds of the margin is kept, one 2% slower is not."""
    model, samples, forward, calls = model_with_recorded_forward()
    a = 'chunked_mlp'
    phase = {'calls': 0}  # 1 while screening, 2 during the together-check
    time_variants = fast_path_select._time_variants

    def counted(*args, **kwargs):
        phase['calls'] += 1
        return time_variants(*args, **kwargs)
    monkeypatch.setattr(fast_path_select, '_time_variants', counted)

    class PhasedTimer(SetTimer):  # {a} off costs 0.9 while screening, `together` in the check
        def __init__(self, together: float):
            super().__init__('train', {})
            self.together = together

        def __call__(self) -> float:
            self.costs = {frozenset([a]): 0.9 if phase['calls'] < 2 else self.together}
            return super().__call__()

    for together, kept in ((1.0 - fast_path_select.MARGIN * 2 / 3, True), (1.02, False)):
        phase['calls'] = 0
        with fast_paths_enabled(True):
            choices, timings = fast_path_select.measure_choices(model, samples, None, torch.device('cpu'),
                                                                modes=['train'], forward=forward,
                                                                timer=PhasedTimer(together))
        assert phase['calls'] == 2 and timings['train'][f'no {a}'] < timings['train']['all on']
        assert (choices['train'][a] is False) == kept, (together, timings['train'])
        assert timings['train']['chosen, timed together'] == pytest.approx(together)


def test_cpu_identity_and_cache_round_trip(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: sse avx512_bf16 fma\n\nprocessor\t: 1\n')
    ident = fast_path_cache.cpu_identity(str(info))
    assert ident['model'] == 'AMD EPYC' and len(ident['flags']) == 12
    info.write_text('model name\t: AMD EPYC\nflags\t\t: sse fma\n')
    assert fast_path_cache.cpu_identity(str(info))['flags'] != ident['flags']  # another flag set, another key
    path = str(tmp_path / 'c' / 'choices.json')
    key = fast_path_cache.cache_key({'cpu': ident, 'b': 1})
    assert fast_path_cache.lookup(key, path) is None
    assert fast_path_cache.store(key, only('sdpa'), {'eval': {'all on': 1.0}}, path) == path
    assert fast_path_cache.lookup(key, path) == only('sdpa')
    with open(path, 'w') as f:
        f.write('{not json')
    assert fast_path_cache.lookup(key, path) is None  # unreadable: ignored, measured again
    assert fast_path_cache.cache_path({'SWIN_FAST_PATHS_CACHE': '/x/y.json'}) == '/x/y.json'
    assert fast_path_cache.cache_path({'XDG_CACHE_HOME': '/c'}) == '/c/swin_fast_paths/choices.json'


def test_config_key_is_validated():
    with pytest.raises(ConfigError, match="MODEL.FAST_PATHS_SELECT = 'fastest' is not one of"):
        load_config(None, ['MODEL.FAST_PATHS_SELECT', 'fastest'])
    assert load_config().MODEL.FAST_PATHS_SELECT == 'measure'


# ----------------------------------------------------------------------------- a run and its resume
sys.path.insert(0, os.path.dirname(__file__))
from test_train import MODEL_DIR, _run_main, _train_args, digits  # noqa: E402,F401  (digits: the fixture)


def _log(run_dir):
    with open(os.path.join(run_dir, 'log_rank0.txt')) as f:
        return [line for line in f if 'fast paths (' in line]


def test_run_records_its_choice_and_a_resume_takes_it_whatever_the_measurement(digits, capsys, tmp_path,
                                                                                monkeypatch):
    """A fresh run measures (the fake timer makes the chunked MLP slow in training), logs and records the choice;
    the run resumed from its checkpoint, where the measurement and the cache now say the opposite, takes the
    recorded choice and measures nothing; a new run reads the cache."""
    monkeypatch.delenv('SWIN_FAST_PATHS_SELECT', raising=False)
    monkeypatch.setenv('SWIN_FAST_PATHS_CACHE', str(tmp_path / 'cache.json'))
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: True)
    original = fast_path_select.measure_choices
    measured = []

    def measure_with(timer):
        def measure(*args, **kwargs):
            measured.append(timer.path)
            return original(*args, **{**kwargs, 'timer': timer})
        return measure

    monkeypatch.setattr(fast_path_select, 'measure_choices', measure_with(FakeTimer('chunked_mlp', 'train', 2.0)))
    seen = []
    real_epoch = engine.train_epoch

    def train_epoch(t, epoch, preemption):  # the choices in force while the run trains
        seen.append(fast_paths.get_fast_path_choices())
        return real_epoch(t, epoch, preemption)

    monkeypatch.setattr(engine, 'train_epoch', train_epoch)
    out = tmp_path / 'run'
    code, _ = _run_main(_train_args(digits, str(out), 1), capsys)
    assert code == 0 and measured == ['chunked_mlp']
    expected = fast_paths.all_on()
    expected['train']['chunked_mlp'] = False
    run_dir = out / MODEL_DIR
    assert torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)['fast_paths'] == expected
    assert seen == [expected]
    lines = _log(run_dir)
    assert len(lines) == 1 and 'measured in' in lines[0] and 'train: off chunked_mlp; eval: off none' in lines[0]

    # The machine now says otherwise (cache rewritten to all on, measurement would turn sdpa off): the resume
    # takes the recorded choice.
    with open(tmp_path / 'cache.json') as f:
        cache = json.load(f)
    for entry in cache.values():
        entry['choices'] = fast_paths.all_on()
    with open(tmp_path / 'cache.json', 'w') as f:
        json.dump(cache, f)
    monkeypatch.setattr(fast_path_select, 'measure_choices', measure_with(FakeTimer('sdpa', 'eval', 2.0)))
    code, _ = _run_main(_train_args(digits, str(out), 2), capsys)
    assert code == 0 and measured == ['chunked_mlp']  # not measured again
    assert seen[1] == expected, _log(run_dir)
    assert torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)['fast_paths'] == expected
    assert 'recorded in the checkpoint resumed from' in _log(run_dir)[-1]

    # A new run of the same model on this machine: the cache (now all on), no measurement.
    code, _ = _run_main(_train_args(digits, str(tmp_path / 'new'), 1), capsys)
    assert code == 0 and measured == ['chunked_mlp'] and seen[2] == fast_paths.all_on()
    assert 'cached in' in _log(tmp_path / 'new' / MODEL_DIR)[-1]


def test_config_switch_off_measures_nothing_and_runs_no_path(digits, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv('SWIN_FAST_PATHS_SELECT', raising=False)
    monkeypatch.setattr(fast_path_select, 'measure_choices', lambda *a, **k: pytest.fail('measured'))
    seen = []
    real_epoch = engine.train_epoch
    monkeypatch.setattr(engine, 'train_epoch', lambda t, e, p: (seen.append(
        [use_fast_path(n, m) for n in PATHS for m in fast_paths.MODES]), real_epoch(t, e, p))[1])
    with fast_paths_enabled(True):
        code, _ = _run_main(_train_args(digits, str(tmp_path), 1, ['MODEL.FAST_PATHS', 'False']), capsys)
    assert code == 0 and seen == [[False] * (2 * len(PATHS))]
    assert 'the fast-path switch is off, so none runs' in _log(tmp_path / MODEL_DIR)[-1]


TINY_OPTS = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16', 'DATA.BATCH_SIZE', '4',
             'MODEL.SWIN.DEPTHS', '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[1, 2]', 'MODEL.NUM_CLASSES', '4',
             'AMP_ENABLE', 'False']


def _select_worker(rank, world, init_file, out_dir):
    import logging
    import torch.distributed as dist
    from models import build_model
    torch.set_num_threads(1)
    os.environ.pop('SWIN_FAST_PATHS_SELECT', None)
    os.environ['SWIN_FAST_PATHS_CACHE'] = os.path.join(out_dir, 'cache.json')
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        config = load_config(None, TINY_OPTS)
        model = build_model(config)
        # each rank's timer would choose another path off: only rank 0's measurement counts
        fake = {0: FakeTimer('chunked_mlp', 'train', 2.0), 1: FakeTimer('sdpa', 'eval', 2.0)}[rank]
        precision = engine.resolve_precision(config, torch.device('cpu'))
        with fast_paths_enabled(True):
            choices = engine.select_fast_paths(config, model, precision, logging.getLogger('test'), timer=fake)
            in_force = fast_paths.get_fast_path_choices()
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump({'choices': choices, 'in_force': in_force, 'readings': fake.readings}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_take_rank_zeros_measurement(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_select_worker, args=(2, str(tmp_path / 'pg_init'), str(tmp_path)), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f'rank{r}.json')) for r in range(2)]
    expected = fast_paths.all_on()
    expected['train']['chunked_mlp'] = False
    assert all(r['choices'] == r['in_force'] == expected for r in results)
    assert results[0]['readings'] > 0 and results[1]['readings'] == 0  # rank 1 timed nothing


def test_a_path_missing_from_a_recorded_choice_stays_off_on_resume():
    """A checkpoint written before a path existed (its record lacks ``onednn_linear``): the resumed run runs
    without that path, as the run it resumes did, and keeps the rest of the record."""
    import logging
    from models import build_model
    config = load_config(None, TINY_OPTS)
    model = build_model(config)
    precision = engine.resolve_precision(config, torch.device('cpu'))
    old = {mode: {p: p != 'chunked_mlp' for p in PATHS if p != 'onednn_linear'} for mode in fast_paths.MODES}
    before = fast_paths.get_fast_path_choices()
    try:
        choices = engine.select_fast_paths(config, model, precision, logging.getLogger('test'), recorded=old)
        for mode in fast_paths.MODES:
            assert choices[mode] == {**old[mode], 'onednn_linear': False}
        assert fast_paths.get_fast_path_choices() == choices
    finally:
        fast_paths.set_fast_path_choices(before)


@pytest.mark.parametrize('dtype', [torch.float32, BF16], ids=['fp32', 'bf16-autocast'])
def test_the_onednn_linear_equals_f_linear_with_gradients(dtype):
    """``onednn_linear`` (CPU; bf16 under autocast where the CPU has native bf16): outputs and all three
    gradients equal ``F.linear``'s to rounding, for 3-D inputs; without gradients the fused GELU equals
    ``F.gelu(F.linear(...))``; with the path off or the switch off it is not taken."""
    if not lowp.onednn_supports(dtype):
        pytest.skip(f'no oneDNN linear for {dtype} here (no oneDNN, or no native bf16)')
    torch.manual_seed(0)
    x = torch.randn(3, 50, 96, requires_grad=True)
    layer = lowp.Linear(96, 384)
    autocast = torch.autocast('cpu', dtype=BF16, enabled=dtype == BF16)
    with autocast:
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    plain_grads = torch.autograd.grad(plain.float().square().sum(), (x, layer.weight, layer.bias))
    with fast_paths_enabled(True), fast_path_choices(only('onednn_linear')), autocast:
        assert lowp.linear_kernel(dtype, x.device) == 'onednn'
        out = layer(x)
        assert out.dtype == dtype and out.grad_fn is not None
        grads = torch.autograd.grad(out.float().square().sum(), (x, layer.weight, layer.bias))
        with torch.no_grad():
            fused = lowp.linear(x, layer.weight, layer.bias, gelu=True)
            fused_plain = torch.nn.functional.gelu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: a unit in the last place of outputs of size ~1
    scale = plain.abs().max().item()
    assert (out - plain).abs().max().item() <= tol * scale
    assert (fused.float() - fused_plain.float()).abs().max().item() <= tol * scale
    for g, g0 in zip(grads, plain_grads):
        assert g.dtype == g0.dtype and (g - g0).abs().max().item() < 1e-4 * g0.abs().max().item()
    with fast_paths_enabled(True), fast_path_choices(NONE):
        assert lowp.linear_kernel(dtype, x.device) != 'onednn'
    with fast_paths_enabled(False):
        assert lowp.linear_kernel(dtype, x.device) == 'aten'


@pytest.mark.parametrize('dtype', [torch.float32, BF16], ids=['fp32', 'bf16-autocast'])
def test_the_onednn_backward_takes_transposed_views_not_copies(monkeypatch, dtype):
    """The input gradient reads the weight through its transposed view, and in fp32 the weight gradient reads
    the output gradient and the input that way too (``lowp.mm``, ``lowp.weight_grad_mm``): a transposed copy of
    every weight at every step cost more than oneDNN saved. In bf16 the weight gradient is aten's mm."""
    if not lowp.onednn_supports(dtype):
        pytest.skip(f'no oneDNN linear for {dtype} here (no oneDNN, or no native bf16)')
    seen = []
    original = lowp._onednn_linear
    monkeypatch.setattr(lowp, '_onednn_linear', lambda x, w, b, post_op='none': seen.append((x, w)) or
                        original(x, w, b, post_op))
    x = torch.randn(3, 50, 96, requires_grad=True)
    layer = lowp.Linear(96, 384)
    with fast_paths_enabled(True), fast_path_choices(only('onednn_linear')), \
            torch.autocast('cpu', dtype=BF16, enabled=dtype == BF16):
        out = layer(x)
        del seen[:]  # the forward's call
        out.float().square().sum().backward()
    assert len(seen) == (2 if dtype == torch.float32 else 1)
    grad_input = seen[0]
    assert grad_input[1].shape == (96, 384) and grad_input[1].stride() == (1, 96)  # the (384, 96) weight, transposed
    if dtype == torch.float32:
        grad, inputs = seen[1]
        assert grad.shape == (384, 150) and grad.stride() == (1, 384)  # (M, N) output gradient, transposed
        assert inputs.shape == (96, 150) and inputs.stride() == (1, 96)  # (M, K) input, transposed


def test_inference_keeps_the_cast_weight_until_the_weight_changes():
    """CPU inference under autocast keeps each weight's bf16 copy (``lowp.cast_weight``): the same tensor while
    the weight is unchanged, a fresh one after an in-place update or a new storage, none kept while a gradient
    is recorded or with the switch off; outputs equal the uncached ones."""
    layer = lowp.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = lowp.cast_weight(layer.weight, BF16, keep=True)
        assert lowp.cast_weight(layer.weight, BF16, keep=True) is first
        layer.weight.mul_(2)
        second = lowp.cast_weight(layer.weight, BF16, keep=True)
        assert second is not first and torch.equal(second, layer.weight.to(BF16))
        layer.weight.data = torch.ones(8, 8)
        assert torch.equal(lowp.cast_weight(layer.weight, BF16, keep=True), torch.ones(8, 8, dtype=BF16))
        assert lowp.cast_weight(layer.weight, BF16, keep=False) is not lowp.cast_weight(layer.weight, BF16, False)
        with fast_paths_enabled(False):
            assert lowp.cast_weight(layer.weight, BF16, keep=True) is not lowp.cast_weight(layer.weight, BF16, True)
        with torch.autocast('cpu', dtype=BF16):
            out, again = layer(x), layer(x)
            layer.weight.add_(1)
            changed = layer(x)
    with torch.autocast('cpu', dtype=BF16):  # the same kernel, uncached (a gradient is recorded)
        assert torch.equal(changed, layer(x).detach())
        with torch.no_grad():
            layer.weight.sub_(1)
        assert torch.equal(out, layer(x).detach())
    assert torch.equal(out, again)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2], ids=['v1', 'v2'])
def test_compiled_cpu_inference_keeps_the_onednn_linear_and_training_graphs_do_not(cls):
    """Under ``torch.compile`` (aot_eager: dynamo + the fake-tensor trace, no C++ code generation) CPU
    inference calls ``swin::onednn_linear`` for every linear layer, the MLP's GELU fused, with no graph break
    and the eager outputs; a training graph, the path chosen off, or the switch off hold ``F.linear`` only."""
    if not lowp.onednn_supports(torch.float32):
        pytest.skip('no oneDNN linear in this torch build')
    model = test_models.randomize(cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    graphs, gelu = [], []

    def recording(gm, example_inputs):  # aot_eager after noting which ops the graph holds
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    def onednn_calls(choices=None, grad=False, switch=True):
        torch._dynamo.reset()
        graphs.clear()
        with fast_paths_enabled(switch), fast_path_choices(choices or {}), torch.set_grad_enabled(grad):
            out = torch.compile(model, backend=recording, fullgraph=True)(x)
        assert len(graphs) == 1  # fullgraph: no graph break
        calls = [node for node in graphs[0].graph.nodes if str(node.target) == 'swin.onednn_linear.default']
        gelu.append(sum(node.args[3] == 'gelu' for node in calls))
        return out, len(calls)

    with torch.no_grad(), fast_paths_enabled(True):
        eager = model(x)
    out, calls = onednn_calls()
    linears = sum(isinstance(m, lowp.Linear) for m in model.modules())
    assert calls == linears  # qkv, proj, fc1 (+ GELU), fc2, the merges' reductions, the head
    assert gelu[-1] == sum(type(m).__name__ == 'Mlp' for m in model.modules()) > 0
    assert (out - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
    assert onednn_calls(grad=True)[1] == 0
    assert onednn_calls(choices={'eval': {'onednn_linear': False}})[1] == 0
    plain, calls = onednn_calls(switch=False)
    assert calls == 0 and (plain - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
    torch._dynamo.reset()
