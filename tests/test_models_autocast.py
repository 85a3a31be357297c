"""Models under autocast (issue 11, items 5-7): the attention and its bias in the compute dtype, the inference
bias cache, the recomputed attention input; and the CUDA forward checked on the CPU with fake CUDA tensors.

Fake CUDA: under ``FakeTensorMode`` tensors can live on ``cuda`` without a GPU; the dispatcher then applies
CUDA's own autocast rules (fp32 LayerNorm and ``normalize``, bf16 matmuls and SDPA) and the fake kernels
compute shapes and dtypes, with CUDA's dtype checks. So the dtype flow of a CUDA forward is tested here, not
guessed. A backward needs a real device and is covered by tests/test_gpu_models.py.
"""
import contextlib
import gc
import math
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models.attention as attention
import models.lowp as lowp
import models.mlp as mlp
import models.swin_common as swin_common
from models import SwinTransformer, SwinTransformerV2
from models.attention import WindowAttentionBase
from test_models import SMALL, randomize

BF16 = torch.bfloat16
MODELS = [SwinTransformer, SwinTransformerV2]
# every test here is of the fast paths: the switch on whatever SWIN_FAST_PATHS says (conftest.py); a data pointer
# of a fake tensor is read by the inference cache key, harmless here
pytestmark = [pytest.mark.filterwarnings('ignore:Accessing the data pointer of FakeTensor'),
              pytest.mark.usefixtures('fast_paths_on')]


def small_model(cls, **kwargs) -> nn.Module:
    return randomize(cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL, **kwargs))


def attention_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, WindowAttentionBase)]


@contextlib.contextmanager
def fake_cuda_autocast(dtype: torch.dtype):
    """Fake tensor mode with CUDA autocast on (``torch.autocast('cuda')`` would refuse without a GPU)."""
    previous = torch.get_autocast_dtype('cuda')
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_autocast_enabled('cuda', True)
        torch.set_autocast_dtype('cuda', dtype)
        try:
            yield
        finally:
            torch.set_autocast_enabled('cuda', False)
            torch.set_autocast_dtype('cuda', previous)


def to_fake_cuda(model: nn.Module) -> nn.Module:
    """Parameters and buffers replaced by fake CUDA tensors of the same shape and dtype (call inside the mode;
    ``model.cuda()`` would need a device)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device='cuda'), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device='cuda')
    return model


def record_attention(monkeypatch) -> list:
    """Records the dtypes and mask shape of every SDPA call and of every matmul-path attention."""
    calls = []
    sdpa, biased_logits = F.scaled_dot_product_attention, attention._biased_logits

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        calls.append(('sdpa', q.dtype, k.dtype, v.dtype, attn_mask.dtype, tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    def recording_logits(q, k, bias, scale):
        calls.append(('matmul', q.dtype, k.dtype, bias.dtype, tuple(bias.shape)))
        return biased_logits(q, k, bias, scale)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording_sdpa)
    monkeypatch.setattr(attention, '_biased_logits', recording_logits)
    return calls


class _OutputStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes, with its size in bytes."""

    def __init__(self):
        super().__init__()
        self.storages: Dict[StorageWeakRef, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[StorageWeakRef(storage)] = storage.nbytes()
        return out


def retained_bytes(fn: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the storages it made that are still alive once it returned, its output's
    excepted: what the autograd graph keeps for backward."""
    mode = _OutputStorages()
    with mode:
        out = fn()
    gc.collect()
    own = StorageWeakRef(out.untyped_storage())
    return out, sum(n for ref, n in mode.storages.items() if ref != own and not ref.expired())


# --- item 5: the bias and the attention in the compute dtype ---

def test_v2_attention_and_bias_in_the_autocast_dtype(monkeypatch):
    """The fp32 logit scale (and CUDA's fp32 normalize) made q, and the bias built for q, fp32: SDPA got an
    fp32 ``(B*nW, nH, N, N)`` mask to cast again, and the training path fp32 logits."""
    model = small_model(SwinTransformerV2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(x)
    calls = record_attention(monkeypatch)
    with torch.no_grad(), torch.autocast('cpu', dtype=BF16):
        infer = model(x)  # eval: SDPA
    assert [c[0] for c in calls] == ['sdpa'] * 8
    assert all(c[1:5] == (BF16,) * 4 for c in calls), calls
    assert (2 * 4, 2, 16, 16) in [c[5] for c in calls]  # the shifted block's mask expanded to B*nW windows
    calls.clear()
    with torch.autocast('cpu', dtype=BF16):
        train = model.train()(x)  # gradients on the CPU: the matmul path
    assert [c[0] for c in calls] == ['matmul'] * 8
    assert all(c[1:4] == (BF16,) * 3 for c in calls), calls
    scale = reference.abs().max().item()
    for out in (infer, train):
        assert out.dtype == BF16 and (out.float() - reference).abs().max().item() < 0.03 * scale


@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('grad', [False, True])
def test_attention_bias_makes_no_fp32_window_tensor(cls, grad):
    """Position bias + mask (fp32 parameters, a bf16 attention) used to be summed in fp32 at ``(nW, nH, N, N)``
    and cast afterwards."""
    model = small_model(cls)
    block = model.layers[0].blocks[1]  # shifted: 4 windows of 16 tokens, 2 heads
    mask = block._geometry.get(8, 8, block.window_size, block.shift_size, torch.device('cpu')).mask  # (4, 16, 16)
    window_elements = 4 * 2 * 16 * 16
    made = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with torch.set_grad_enabled(grad), Dtypes():
        bias = block.attn.attention_bias(mask, BF16)
    assert bias.dtype == BF16 and bias.shape == (4, 2, 16, 16)
    fp32_windows = [shape for dtype, shape in made
                    if dtype == torch.float32 and shape[-2:] == (16, 16) and math.prod(shape) >= window_elements]
    assert not fp32_windows
    with torch.no_grad():
        expected = block.attn.position_bias().float() + mask.unsqueeze(1)
    assert torch.allclose(bias.float(), expected, rtol=1e-2, atol=1e-2)


# --- item 6: the inference bias cache ---

@pytest.mark.parametrize('cls', MODELS)
def test_bias_cache_holds_one_entry_per_module_across_epochs(cls):
    """Parameter versions change every epoch: each validation used to add an entry (up to nine)."""
    model = small_model(cls)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    for epoch in range(3):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            cached = model(x)
        assert [len(m._bias_cache) for m in attention_modules(model)] == [1] * 8, f'epoch {epoch}'
        fresh = model(x)  # gradients on: the bias is rebuilt, not served
        assert torch.allclose(cached, fresh, atol=1e-5)


@pytest.mark.parametrize('cls', MODELS)
def test_validation_after_a_fused_adamw_step_sees_the_new_weights(cls):
    """torch's fused AdamW updates weights in place without bumping their version counters: a cache keyed on
    versions alone served the previous epoch's bias to this epoch's validation (found through inexact resume)."""
    model = small_model(cls)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 3, 32, 32)
    for epoch in range(2):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            served = model(x)
            fresh = small_model(cls)
            fresh.load_state_dict(model.state_dict())
            expected = fresh.eval()(x)
        assert torch.equal(served, expected), f'epoch {epoch}'


def test_bias_cache_serves_each_compute_dtype_its_own_bias(monkeypatch):
    """The key ignored the autocast state: a V2 bias computed under bf16 autocast (its cpb MLP in bf16) was
    served to an fp32 evaluation, and under autocast the bias was fp32."""
    model = small_model(SwinTransformerV2).eval()
    x = torch.randn(2, 3, 32, 32)
    served = []
    build = WindowAttentionBase.attention_bias

    def recording(self, mask, dtype):
        bias = build(self, mask, dtype)
        served.append((self, mask, bias))
        return bias

    monkeypatch.setattr(WindowAttentionBase, 'attention_bias', recording)
    for autocast in (True, False, True):
        served.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=BF16, enabled=autocast):
            model(x)
        assert len(served) == 8
        for attn, mask, bias in served:
            expected = attn.position_bias().unsqueeze(0)  # fp32, no autocast, no cache
            if mask is not None:
                expected = expected + mask.unsqueeze(1)
            if autocast:
                assert bias.dtype == BF16 and torch.allclose(bias.float(), expected, rtol=1e-2, atol=1e-2)
            else:
                assert bias.dtype == torch.float32 and torch.allclose(bias, expected, atol=1e-6)


# --- item 7: the attention input recomputed in backward ---

@pytest.mark.parametrize('native', [False, True], ids=['upcast', 'native'])
def test_recomputed_attention_input_is_not_kept_when_the_norm_is_fp32(monkeypatch, native):
    """A V1 block on an fp32 residual under autocast: the norm outputs fp32 (always so under CUDA autocast,
    here on the CPU for an fp32 input) and the qkv linear saved its own bf16 cast of the windows, which the
    recipe keyed on the windows did not replace: nothing was saved. Now exactly the windows' bytes are."""
    monkeypatch.setattr(lowp, 'cpu_native', lambda dtype: native)  # lowp's upcast linear, or PyTorch's
    model = small_model(SwinTransformer)
    block = model.layers[0].blocks[1]  # shifted
    x = torch.randn(2, 64, 32, requires_grad=True)
    g = torch.randn(2, 64, 32)
    with torch.autocast('cpu', dtype=BF16):
        block(x, (8, 8))  # builds the geometry (kept by the block) outside the measurement
    kept, grads = {}, {}
    for recompute in (False, True):
        block.zero_grad()
        x.grad = None
        with torch.autocast('cpu', dtype=BF16):
            out, kept[recompute] = retained_bytes(lambda: block(x, (8, 8), recompute_norm=recompute))
        out.backward(g)
        grads[recompute] = [x.grad] + [p.grad for p in block.parameters()]
    windows_bytes = 2 * 4 * 16 * 32 * 2  # (B*nW, N, C) in bf16
    assert kept[False] - kept[True] == windows_bytes
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


def test_cuda_autocast_v1_keeps_no_attention_input(monkeypatch):
    """On (fake) CUDA under bf16 autocast every V1 block's attention input is saved as a recipe, once."""
    recipes = []

    class CountingRecipe(swin_common._Recipe):
        def __new__(cls, *args):
            recipes.append(args[0])
            return super().__new__(cls, *args)

    monkeypatch.setattr(swin_common, '_Recipe', CountingRecipe)
    model = SwinTransformer(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL)
    with fake_cuda_autocast(BF16):
        model = to_fake_cuda(model)
        model(torch.empty(2, 3, 32, 32, device='cuda'))
    # stages of 8x8, 4x4, 2x2, 1x1 tokens (windows shrink to the map), two blocks each: the (B*nW, N, C)
    # windows as the linear saves them, (B*nW*N, C)
    assert recipes == [(128, 32)] * 2 + [(32, 64)] * 2 + [(8, 128)] * 2 + [(2, 256)] * 2


# --- the CUDA forward: dtypes, and the CPU-only paths off ---

@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cuda_autocast_forward_runs_attention_in_low_precision(monkeypatch, cls, dtype):
    """A training forward on (fake) CUDA under autocast: SDPA for every block with q, k, v and the mask in
    the autocast dtype (V2 used to hand it fp32 ones), and none of the CPU-only paths (contiguous head
    split, matmul attention, upcast linears, MLP row chunks). The MLP's folded LayerNorm used to run on a
    bf16 residual with fp32 weights, which CUDA's kernel rejects (after the first patch merging)."""
    calls = record_attention(monkeypatch)

    def cpu_only(*args):
        raise AssertionError('a CPU-only path ran on CUDA')

    monkeypatch.setattr(attention._SplitHeads, 'apply', cpu_only)
    monkeypatch.setattr(lowp._UpcastLinear, 'apply', cpu_only)
    chunks = []
    chunk_rows = mlp.chunk_rows

    def recording_chunk_rows(rows, *args):
        chunks.append((rows, chunk_rows(rows, *args)))
        return chunks[-1][1]

    monkeypatch.setattr(mlp, 'chunk_rows', recording_chunk_rows)
    model = cls(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL)
    with fake_cuda_autocast(dtype):
        model = to_fake_cuda(model)
        out = model(torch.empty(2, 3, 32, 32, device='cuda'))
    assert out.dtype == dtype and out.requires_grad
    assert [c[0] for c in calls] == ['sdpa'] * 8
    assert all(c[1:5] == (dtype,) * 4 for c in calls), calls
    assert (8, 2, 16, 16) in [c[5] for c in calls]  # the shifted block: its (nW, ...) mask expanded to B*nW
    assert len(chunks) == 8 and all(rows == chunk for rows, chunk in chunks)
