#!/usr/bin/env python
"""Export a trained Swin to ONNX (dynamic batch axis) and/or safetensors.

The ONNX file is checked against the PyTorch model on a random batch with onnxruntime when it is installed
(the max abs difference of the logits is printed; ``--atol`` bounds it). The checkpoint is read only through
the project's safe loader (``weights_only=True``). The config comes from ``--cfg`` (+ ``--opts``) or, when
omitted, from the config stored in the checkpoint.

    python scripts/export.py --resume demo_output/swin_demo_digits_48_ft/default/ckpt_best.pth \\
        --onnx model.onnx --safetensors model.safetensors
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if TYPE_CHECKING:
    import torch

# torch and the project modules are imported where they are used, so that --help is instant.


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the known, harmless warnings of the TorchScript ONNX export: its own deprecation notices, and
    the tracer's "converting a tensor to a Python boolean" on the model's shape checks (window padding, odd
    sizes), which depend only on the image size that the export fixes; the batch stays dynamic, and
    ``check_onnx`` compares the file with PyTorch at another batch size."""
    import torch
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning, message='You are using the legacy TorchScript')
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx')
        yield


def image_hw(img_size: Any) -> Tuple[int, int]:
    """``img_size`` (an int: a square, or (height, width), as ``DATA.IMG_SIZE``) as (height, width)."""
    return (int(img_size[0]), int(img_size[1])) if isinstance(img_size, (tuple, list)) else (int(img_size),) * 2


def export_onnx(model: torch.nn.Module, path: str, img_size: Any, in_chans: int = 3, opset: int = 17) -> None:
    """Trace ``model`` (eval mode, CPU) to ONNX with inputs ``(batch, C, H, W)`` where batch is dynamic;
    ``img_size`` an int (square) or (height, width).

    Written atomically like the checkpoints (a same-folder temp file renamed over ``path``, so an interrupted
    export never leaves a truncated model under the final name), with the mode the user's umask gives.
    """
    import torch
    example = torch.randn(2, in_chans, *image_hw(img_size))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}.onnx')
    kwargs = dict(input_names=['images'], output_names=['logits'], opset_version=opset,
                  dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}})
    try:
        with quiet_tracing():
            try:  # torch >= 2.5 has a dynamo exporter; the TorchScript one is the one that handles dynamic_axes here
                torch.onnx.export(model, (example,), tmp, dynamo=False, **kwargs)
            except TypeError:
                torch.onnx.export(model, (example,), tmp, **kwargs)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_onnx(model: torch.nn.Module, path: str, img_size: Any, in_chans: int = 3, batch: int = 3
               ) -> Optional[float]:
    """Max abs logit difference between onnxruntime and PyTorch on a random batch; None without onnxruntime.

    ``batch`` differs from the export batch (2) so the dynamic axis is exercised.
    """
    import torch
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    images = torch.randn(batch, in_chans, *image_hw(img_size))
    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    (got,) = session.run(['logits'], {'images': images.numpy()})
    if got.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return float(abs(got - expected).max())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resume', '--checkpoint', dest='checkpoint', required=True,
                        help='checkpoint (.pth with a "model" entry, or .safetensors)')
    parser.add_argument('--cfg', help='config file of the model (default: the config stored in the checkpoint)')
    parser.add_argument('--opts', nargs='+', default=[], help='KEY VALUE config overrides')
    parser.add_argument('--onnx', metavar='FILE', help='write an ONNX model here')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (default: 17)')
    parser.add_argument('--atol', type=float, default=1e-3,
                        help='largest accepted |onnxruntime - PyTorch| logit difference (default: 1e-3)')
    parser.add_argument('--safetensors', metavar='FILE', help='write the model weights as safetensors here')
    parser.add_argument('--ema', action='store_true', help="export the EMA weights ('ema' entry) instead")
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow full unpickling of a legacy checkpoint (only for files you trust)')
    args = parser.parse_args(argv)
    if not (args.onnx or args.safetensors):
        parser.error('nothing to do: give --onnx FILE and/or --safetensors FILE')
    from scripts.predict import load_model
    from utils.checkpoint import export_safetensors
    try:
        model, config = load_model(args.checkpoint, args.cfg, args.opts, ema=args.ema, trust=args.trust_checkpoint)
    except Exception as e:  # bad file, config or mismatch: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 1
    img_size = image_hw(config.DATA.IMG_SIZE)
    from config import model_in_chans
    in_chans = model_in_chans(config)
    if args.safetensors:
        export_safetensors(model.state_dict(), args.safetensors,
                           metadata={'model_type': config.MODEL.TYPE, 'model_name': config.MODEL.NAME})
        print(f"wrote {args.safetensors}")
    if args.onnx:
        export_onnx(model, args.onnx, img_size, in_chans, args.opset)
        print(f"wrote {args.onnx} (input 'images': batch x {in_chans} x {img_size[0]} x {img_size[1]}, dynamic batch)")
        diff = check_onnx(model, args.onnx, img_size, in_chans)
        if diff is None:
            print("onnxruntime is not installed: output not checked (pip install onnxruntime)")
        else:
            print(f"onnxruntime check: max abs diff {diff:.3e} (batch 3)")
            if diff > args.atol:
                print(f"error: difference {diff:.3e} exceeds --atol {args.atol}", file=sys.stderr)
                return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
