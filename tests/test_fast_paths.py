"""The one fast-path switch of models/ (models/fast_paths.py): the parity tests with it off (they run with it on
in their own files), no fast path taken while it is off, equal outputs either way, and how it is set."""
import importlib
import pytest
import torch

import models.attention as attention
import models.fast_paths as fast_paths
import models.lowp as lowp
import models.mlp as mlp
import models.swin_common as swin_common
import models.swin_transformer as swin_transformer
import models.swin_transformer_v2 as swin_v2
import models.window_ops as window_ops
import test_models
import test_simmim
from config import load_config
from models import SwinTransformer, SwinTransformerV2, build_model
from models.fast_paths import fast_path_choices, fast_paths_enabled, use_fast_paths
from models.swin_moe import WindowAttentionMoE

SMALL = test_models.SMALL
BF16 = torch.bfloat16


# ----------------------------------------------------------------------------- parity with the switch off
@pytest.mark.parametrize('v2', [False, True], ids=['v1', 'v2'])
@pytest.mark.parametrize('size,window', [(224, 7), (256, 8)])
def test_timm_parity_with_fast_paths_off(v2, size, window):
    """The small architecture, windows of 7 (the last stage's shrinking to the map) and 8. The official -100
    mask makes the reference path slow on x86 (subnormal softmax weights): the 384 px and tiny cases of
    test_models would add several seconds each, so they run with the switch on only."""
    with fast_paths_enabled(False):
        (test_models.test_v2_matches_timm if v2 else test_models.test_v1_matches_timm)(SMALL, size, window)


@pytest.mark.parametrize('version', ['v1', 'v2'])
@pytest.mark.parametrize('case', ['plain', 'norm47'])
def test_official_simmim_parity_with_fast_paths_off(version, case):
    with fast_paths_enabled(False):
        test_simmim.test_loss_equals_official(version, case)
        if case == 'plain':
            test_simmim.test_encoder_output_equals_official(version)


@pytest.mark.parametrize('v2', [False, True], ids=['v1', 'v2'])
def test_bf16_autocast_parity_with_fast_paths_off(monkeypatch, v2):
    """bf16 autocast within bf16 precision of fp32, on PyTorch's own kernels (native or not: no upcast)."""
    with fast_paths_enabled(False):
        test_models.test_bf16_autocast_with_and_without_upcast_agree(monkeypatch, v2)


# ----------------------------------------------------------------------------- none taken while off
def spy_on_fast_paths(monkeypatch) -> dict:
    """Counts the calls of every fast path's own code (and of the official attention and windows)."""
    calls = {}

    def spy(owner, name, key):
        original = getattr(owner, name)
        calls[key] = 0

        def counting(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    spy(lowp._UpcastLinear, 'apply', 'upcast linear (grad)')
    spy(lowp, '_rounded', 'upcast operands')
    spy(lowp._OneDnnLinear, 'apply', 'oneDNN linear (grad)')
    spy(lowp, '_onednn_linear', 'oneDNN linear')
    spy(mlp._ChunkedMlp, 'apply', 'chunked MLP (grad)')
    spy(mlp, '_mlp_forward', 'chunked MLP forward')
    spy(attention._SplitHeads, 'apply', 'contiguous heads')
    spy(attention, 'window_attention', 'fast attention V1')  # V1's forward is attention.ScaledWindowAttention's
    spy(swin_v2, 'window_attention', 'fast attention V2')
    spy(attention.F, 'scaled_dot_product_attention', 'SDPA')
    spy(attention, '_biased_logits', 'fused scale-add')
    spy(attention, '_softmax_in_place', 'softmax in place')
    spy(attention.WindowAttentionBase, 'attention_bias', 'combined bias (cached)')
    spy(window_ops.GeometryCache, 'get', 'geometry cache')
    spy(window_ops.WindowGeometry, 'partition', 'window gather')
    spy(window_ops._PermuteTokens, 'apply', 'permutation backward')
    spy(swin_common, 'recompute_when_saved', 'recomputed attention input')
    spy(attention.WindowAttentionBase, 'official_attention', 'official attention')
    spy(window_ops.ReferenceWindows, 'partition', 'official windows')
    return calls


OFFICIAL = ('official attention', 'official windows')


def run_model(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """A training forward + backward and an inference forward (under CPU autocast for bf16)."""
    autocast = dict(device_type='cpu', dtype=BF16, enabled=dtype == BF16)
    model.zero_grad()
    model.train()
    with torch.autocast(**autocast):
        out = model(x)
    out.float().square().sum().backward()
    model.eval()
    with torch.no_grad(), torch.autocast(**autocast):
        infer = model(x)
    return out.float(), infer.float(), torch.cat([p.grad.flatten() for p in model.parameters()])


def assert_close_gradients(fast: torch.Tensor, official: torch.Tensor) -> None:
    """fp32 gradients of all parameters (one vector) within 1e-5 of their norm. Measured for these models: on and
    off differ by 0.8e-6 (V1) and 1.2e-6 (V2) of the norm, today's fused and plain attention by 0.9e-6; single
    entries by up to 6e-5 of gradients up to 31 (V2), which a fixed atol of 1e-5 does not allow for."""
    assert (fast - official).norm() < 1e-5 * official.norm()


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_switch_off_takes_no_fast_path_and_gives_the_same_outputs(monkeypatch, cls):
    """Every fast path runs with the switch on (so the spies see them), none with it off, and off gives the
    outputs and gradients of on: in fp32 to the parity tolerance, in bf16 both to bf16 precision of fp32."""
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: False)  # this CPU's upcast path, whatever it has
    model = test_models.randomize(cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    x = torch.randn(2, 3, 32, 32)  # 8x8 tokens: shifted windows of 4, no padding (the permutation path)
    calls = spy_on_fast_paths(monkeypatch)
    results, matmul_infer = {}, {}
    for on in (True, False):
        for key in calls:
            calls[key] = 0
        with fast_paths_enabled(on):
            results[on] = {dtype: run_model(model, x, dtype) for dtype in (torch.float32, BF16)}
            # bf16 inference on the matmul attention (SDPA takes it above): its in-place bias add and softmax
            with fast_path_choices({'eval': {'sdpa': False}}), torch.no_grad(), torch.autocast('cpu', dtype=BF16):
                matmul_infer[on] = model(x).float()
        fast = {key: n for key, n in calls.items() if key not in OFFICIAL}
        if on:
            # V2 recomputes no attention input; each model calls its own module's window_attention
            other = ('recomputed attention input', 'fast attention V1') if cls is SwinTransformerV2 else \
                ('fast attention V2',)
            missed = [key for key, n in fast.items() if n == 0 and key not in other]
            assert not missed, f'fast paths not taken with the switch on: {missed}'
            assert all(calls[key] == 0 for key in OFFICIAL), calls
        else:
            assert not any(fast.values()), f'fast paths taken with the switch off: {fast}'
            assert all(calls[key] > 0 for key in OFFICIAL), calls
    for dtype, (out_on, infer_on, grad_on) in results[True].items():
        out_off, infer_off, grad_off = results[False][dtype]
        if dtype == torch.float32:
            for a, b in ((out_on, out_off), (infer_on, infer_off)):
                assert (a - b).abs().max().item() < 1e-5
            assert_close_gradients(grad_on, grad_off)
        else:  # today's bf16 tolerances (test_bf16_autocast_with_and_without_upcast_agree): each within bf16
            # precision of fp32, gradients within 5% of each other
            fp32_out, fp32_infer, _ = results[False][torch.float32]
            scale = fp32_out.abs().max().item()
            for a, b in ((out_on, fp32_out), (out_off, fp32_out), (infer_on, fp32_infer), (infer_off, fp32_infer),
                         (matmul_infer[True], fp32_infer), (matmul_infer[False], fp32_infer)):
                assert (a - b).abs().max().item() < 0.03 * scale
            assert (grad_on - grad_off).norm() < 0.05 * grad_off.norm()


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_official_windows_and_merging_equal_the_fast_ones(cls):
    """Maps of odd sizes: the official pad/roll/partition, the -100 mask and the four-slice merge give the
    gather index's and the permute's results (through the whole model, gradients included)."""
    model = test_models.randomize(cls(img_size=64, window_size=4, num_classes=5, drop_path_rate=0.0, **SMALL))
    x = torch.randn(2, 3, 60, 70)  # 15x18 tokens: windows padded to 16x20, shifted; merging pads 15 to 16
    results = {on: None for on in (True, False)}
    for on in results:
        with fast_paths_enabled(on):
            results[on] = run_model(model, x, torch.float32)
    for a, b in zip(results[True][:2], results[False][:2]):
        assert (a - b).abs().max().item() < 1e-5
    assert_close_gradients(results[True][2], results[False][2])
    reference = window_ops.ReferenceWindows(15, 18, (4, 4), (2, 2), torch.device('cpu'))
    assert reference.mask.min().item() == window_ops.OFFICIAL_MASK_VALUE == -100.0
    tokens = torch.randn(2, 15 * 18, 3)
    fast = window_ops.WindowGeometry(15, 18, (4, 4), (2, 2), torch.device('cpu'))
    assert torch.equal(reference.partition(tokens), fast.partition(tokens))
    assert torch.equal(reference.reverse(reference.partition(tokens), 2), tokens)
    merged = {}
    for on in (True, False):
        with fast_paths_enabled(on):
            merged[on] = window_ops.merge_2x2(tokens, 15, 18)
    assert torch.equal(merged[True][0], merged[False][0]) and merged[True][1:] == merged[False][1:] == (8, 9)


@pytest.mark.parametrize('version', ['v1', 'v2', 'moe'])
def test_the_position_bias_and_the_combined_attention_bias_are_contiguous(version):
    """As in the official code (``permute(2, 0, 1).contiguous()``): a permuted ``(nH, N, N)`` view made every add of
    the bias to the logits a strided loop, 4 ms instead of 0.3 for one stage-1 block of Swin-T batch 8."""
    cls = {'v1': swin_transformer.WindowAttention, 'v2': swin_v2.WindowAttentionV2, 'moe': WindowAttentionMoE}[version]
    module = cls(32, (4, 4), 2).eval()
    assert module.position_bias().shape == (2, 16, 16) and module.position_bias().is_contiguous()
    mask = torch.zeros(3, 16, 16)
    with torch.no_grad():
        for m in (None, mask):
            bias = module.attention_bias(m, torch.bfloat16)
            assert bias.is_contiguous() and bias.shape == ((3 if m is not None else 1), 2, 16, 16)


@pytest.mark.parametrize('dtype', [BF16, torch.float16])
def test_the_in_place_softmax_of_inference_equals_softmax_in_every_chunk(monkeypatch, dtype):
    """Low-precision CPU logits without gradients: softmax in fp32 chunk by chunk (a last chunk shorter), written
    into the logits' own buffer, equal to ``softmax`` to one rounding of the low-precision result; not taken with
    gradients, for fp32, or with the switch off."""
    monkeypatch.setattr(attention, 'SOFTMAX_CHUNK_BYTES', 4 * 49 * 5)  # 5 rows of 49 a chunk: 3 * 7 * 49 rows
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 49, 49) * 4).to(dtype)
    want = logits.float().softmax(-1)
    with torch.no_grad():
        assert attention._softmax_in_place_applies(logits)
        buffer = logits.clone()
        got = attention._softmax_in_place(buffer)
    assert got.data_ptr() == buffer.data_ptr() and got.dtype == dtype
    assert torch.equal(got, want.to(dtype))  # fp32 softmax rounded once: the reference itself
    assert (got.float() - logits.softmax(-1).float()).abs().max() <= torch.finfo(dtype).eps  # the native kernel
    assert not attention._softmax_in_place_applies(logits)  # gradients recorded (grad mode on here)
    with torch.no_grad():
        assert not attention._softmax_in_place_applies(logits.float())
        assert not attention._softmax_in_place_applies(logits.transpose(-2, -1))
        with fast_paths_enabled(False):
            assert not attention._softmax_in_place_applies(logits)


# ----------------------------------------------------------------------------- setting the switch
def test_environment_variable_is_read_once_at_import(monkeypatch):
    assert fast_paths.enabled_by_environment({}) is True
    for value, expected in (('0', False), ('off', False), ('False', False), ('1', True), ('on', True), ('', True)):
        assert fast_paths.enabled_by_environment({'SWIN_FAST_PATHS': value}) is expected
    with pytest.raises(ValueError, match='SWIN_FAST_PATHS'):
        fast_paths.enabled_by_environment({'SWIN_FAST_PATHS': 'maybe'})
    try:
        monkeypatch.setenv('SWIN_FAST_PATHS', '0')
        importlib.reload(fast_paths)
        assert not use_fast_paths() and not lowp.upcast_dtype(BF16, torch.device('cpu'))
        monkeypatch.setenv('SWIN_FAST_PATHS', '1')  # read once: a change after the import changes nothing
        assert not use_fast_paths()
    finally:
        monkeypatch.undo()
        importlib.reload(fast_paths)


def test_set_fast_paths_and_the_context_manager():
    with fast_paths_enabled(True):
        fast_paths.set_fast_paths(False)
        assert not use_fast_paths() and not fast_paths.use_eager_fast_paths()
        with fast_paths_enabled(True):
            assert use_fast_paths() and fast_paths.use_eager_fast_paths()
        assert not use_fast_paths()
    with fast_paths_enabled(False), pytest.raises(RuntimeError):
        raise RuntimeError('the previous state comes back after an error too')


def test_config_key_turns_the_switch_off_in_build_model():
    opts = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
            'MODEL.SWIN.DEPTHS', '[1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 2]', 'MODEL.NUM_CLASSES', '3']
    assert load_config().MODEL.FAST_PATHS is True
    with fast_paths_enabled(True):
        build_model(load_config(None, opts))
        assert use_fast_paths()  # True leaves the switch as it is
        build_model(load_config(None, opts + ['MODEL.FAST_PATHS', 'False']))
        assert not use_fast_paths()
        build_model(load_config(None, opts))
        assert not use_fast_paths()  # ... also when it is off: any off wins
