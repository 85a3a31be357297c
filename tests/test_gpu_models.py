"""GPU self-check for the models (issue 11): window attention per SDPA backend against an fp64 reference,
bias gradients, autocast against fp32, the compute dtype of the bias (item 5), the recomputed attention
input (item 7), and the CPU-only paths off. Every test needs CUDA and is skipped without it."""
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import models.attention as attention
import models.lowp as lowp
import models.mlp as mlp
from models import SwinTransformer, SwinTransformerV2
from models.attention import window_attention
from test_models import SMALL, randomize
from test_models_autocast import record_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
              pytest.mark.usefixtures('fast_paths_on')]  # tests of the fast paths (conftest.py)

DEVICE = 'cuda'  # a constant so that the arithmetic can be dry-run elsewhere
MODELS = [SwinTransformer, SwinTransformerV2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative error (norm of the difference over norm of the reference) allowed per input dtype. Measured on the
# CPU for these inputs (matmul path and SDPA's math kernel): 1.5-2e-7 in fp32, 2-6e-4 in fp16, 1.7-5e-3 in
# bf16, i.e. one to three units of the dtype's rounding; the bounds leave 4-50x of that to other kernels.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH]


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch):
    """fp32 matmuls in full fp32 (TF32 off) whatever another test or the trainer set."""
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double().cpu() - reference).norm() / reference.norm()).item()


def window_inputs(dtype: torch.dtype, device: str):
    """q, k, v ``(B*nW, nH, N, d)`` and a bias ``(nW, nH, N, N)`` with a shifted-window mask in it: Swin-T's
    window of 7 (N = 49, not a multiple of 8) and head size 32, 2 images of 4 windows, 3 heads."""
    from models.window_ops import shifted_window_mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 3, 49, 32, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 49, 49, generator=g) + shifted_window_mask(14, 14, (7, 7), (3, 3)).unsqueeze(1)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, bias)]


def attention_and_grads(inputs, fused: bool, grad_out: torch.Tensor):
    out = window_attention(*inputs[:3], inputs[3], 32 ** -0.5, fused)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.device, out.dtype))
    return [out] + list(grads)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('backend', BACKENDS, ids=lambda b: b.name)
def test_fused_and_plain_attention_match_fp64(backend, dtype):
    """SDPA with the backend pinned, and the matmul path, against fp64 on the CPU: output and the gradients
    of q, k, v and the bias (the position-bias table's gradient flows through it). Flash attention takes no
    additive mask, and Swin's attention always has one (the position bias): pinned to it, the fused path must
    refuse with torch's 'No available kernel' (never a silent fallback), and the matmul path is checked."""
    grad_out = torch.randn(8, 3, 49, 32, generator=torch.Generator().manual_seed(1))
    inputs = window_inputs(dtype, DEVICE)
    # the reference sees the same rounded inputs: only the arithmetic is compared
    reference = attention_and_grads([t.detach().double().cpu().requires_grad_() for t in inputs], False, grad_out)
    paths = []
    with warnings.catch_warnings(record=True) as why, sdpa_kernel(backend):
        if backend == SDPBackend.FLASH_ATTENTION:
            with pytest.raises(RuntimeError, match='No available kernel'):
                attention_and_grads(inputs, True, grad_out)
        else:
            try:
                paths.append(('fused', attention_and_grads(inputs, True, grad_out)))
            except RuntimeError as error:
                # cuDNN's attention with an additive mask and its gradient depends on the version and the dtype
                if backend == SDPBackend.CUDNN_ATTENTION and 'No available kernel' in str(error):
                    pytest.skip(f'{backend.name} has no kernel for {dtype} with an additive mask and its '
                                f'gradient: {"; ".join(str(w.message) for w in why)}')
                raise
    paths.append(('plain', attention_and_grads(inputs, False, grad_out)))
    names = ['out', 'grad q', 'grad k', 'grad v', 'grad bias']
    for path, values in paths:
        for name, value, ref in zip(names, values, reference):
            assert value.dtype == dtype and torch.isfinite(value).all(), f'{path} {name}'
            err = rel_error(value, ref)
            assert err < REL_TOL[dtype], f'{backend.name} {path} {name}: relative error {err:.2e}'


@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_train_step_gives_nonzero_bias_gradients(cls, dtype):
    """A CUDA train step under autocast (SDPA with the additive bias): every V1 position-bias table and every
    V2 cpb MLP gets a finite, non-zero gradient."""
    model = randomize(cls(img_size=64, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL)).to(DEVICE)
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        loss = model(x).float().square().mean()
    loss.backward()
    names = ('relative_position_bias_table',) if cls is SwinTransformer else ('cpb_mlp',)
    grads = {n: p.grad for n, p in model.named_parameters() if any(k in n for k in names)}
    assert len(grads) >= 8
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize('cls', MODELS)
def test_eval_under_bf16_autocast_matches_fp32(cls):
    """Eval forward on CUDA: bf16 autocast within bf16 precision of fp32, and fp32 equal to the CPU's."""
    model = randomize(cls(img_size=64, window_size=4, num_classes=10, **SMALL)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x)
        model.to(DEVICE)
        fp32 = model(x.to(DEVICE))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            bf16 = model(x.to(DEVICE))
    scale = fp32.abs().max().item()
    assert (fp32.cpu() - cpu).abs().max().item() < 1e-4 * scale
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - fp32).abs().max().item() < 0.03 * scale


@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_attention_runs_in_the_autocast_dtype_and_cpu_paths_stay_off(monkeypatch, cls, dtype):
    """Issue 11 item 5 on CUDA: q, k, v and the bias reach SDPA in the autocast dtype (V2's fp32 normalize
    and logit scale used to make them fp32), in training and in eval; the CPU-only paths (contiguous head
    split, matmul attention, upcast linears, MLP row chunks) never run."""
    calls = record_attention(monkeypatch)

    def cpu_only(*args):
        raise AssertionError('a CPU-only path ran on CUDA')

    monkeypatch.setattr(attention._SplitHeads, 'apply', cpu_only)
    monkeypatch.setattr(lowp._UpcastLinear, 'apply', cpu_only)
    chunk_rows = mlp.chunk_rows

    def one_chunk(rows, *args):
        if chunk_rows(rows, *args) != rows:
            cpu_only()
        return rows

    monkeypatch.setattr(mlp, 'chunk_rows', one_chunk)
    model = randomize(cls(img_size=64, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL)).to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    for training in (True, False):
        calls.clear()
        model.train(training)
        with torch.set_grad_enabled(training), torch.autocast(DEVICE, dtype=dtype):
            out = model(x)
        if training:
            out.float().sum().backward()
        assert [c[0] for c in calls] == ['sdpa'] * 8
        assert all(c[1:5] == (dtype,) * 4 for c in calls), calls


def test_recomputed_attention_input_is_not_kept_under_cuda_autocast():
    """Issue 11 item 7 on CUDA: a V1 block on an fp32 residual under bf16 autocast keeps exactly the bytes
    of its attention's input windows less when they are recomputed in backward; gradients are bitwise equal."""
    model = randomize(SwinTransformer(img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0, **SMALL))
    block = model.layers[0].blocks[1].to(DEVICE)  # shifted
    x = torch.randn(2, 64, 32, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 64, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        block(x, (8, 8))  # the geometry (indices, mask) is built and kept outside the measurement
    kept, grads = {}, {}
    for recompute in (False, True):
        block.zero_grad()
        x.grad = None
        torch.cuda.synchronize()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            before = torch.cuda.memory_allocated()
            out = block(x, (8, 8), recompute_norm=recompute)
            kept[recompute] = torch.cuda.memory_allocated() - before
        out.backward(g)
        grads[recompute] = [x.grad] + [p.grad for p in block.parameters()]
    windows_bytes = 2 * 4 * 16 * 32 * 2  # (B*nW, N, C) in bf16: 8 KiB, a multiple of the allocator's 512 B
    assert kept[False] - kept[True] == windows_bytes
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
