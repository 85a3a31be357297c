"""Per-GPU training memory of a Swin config: DDP vs FSDP vs FSDP + activation checkpointing.

    python scripts/estimate_memory.py --cfg configs/swinv2/swinv2_giant_patch4_window12_192_22k.yaml \\
        --world-size 64 --batch-size 1 [--amp-dtype bfloat16] [--opts KEY VALUE ...]

How each line is obtained (nothing is allocated: the model is built and run under torch's FakeTensorMode,
tensors with shapes and dtypes but no storage):

- weights, gradients, AdamW state: counted from the parameters (fp32 master weights and gradients, two fp32
  moments); under FSDP divided by the world size (each rank holds 1/W of every tensor), plus the largest
  block gathered in the compute dtype twice (the block in use and the prefetched next one) and its
  unsharded fp32 gradient before the reduce-scatter;
- activations: measured, not modelled: one forward of ``--batch-size`` images at ``DATA.IMG_SIZE`` (fake
  tensors, under autocast in the AMP dtype) with a saved-tensor hook that adds up the bytes autograd keeps for
  backward (each storage once, parameters excluded). Under DDP that includes autocast's low-precision copies
  of the fp32 weights; under FSDP the weights are gathered in the compute dtype and need none. With
  checkpointing, what is kept is measured the same way with ``TRAIN.USE_CHECKPOINT`` on, plus the most any
  one block saves (its recomputation in backward).
  The fake run takes the model's CPU code paths, which save about what the CUDA ones do.

Not counted: the CUDA context (~0.5-1 GB), allocator fragmentation, DDP's gradient buckets (another copy of
the gradients), NCCL buffers, temporary buffers inside kernels, the data loader.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 1024 ** 3


def saved_bytes(model, images) -> int:
    """Bytes autograd saves for backward in one forward of ``images`` (each storage counted once; parameters
    and views of them, such as a transposed weight, are not activations)."""
    import torch
    out = {}
    with torch.autograd.graph.saved_tensors_hooks(_counter(out, model), lambda t: t):
        model(images)
    return out['bytes']


def largest_block(model) -> Tuple[int, object]:
    """(parameter count, module) of the Swin block with most parameters."""
    from models.swin_common import SwinBlock
    blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
    return max(((sum(p.numel() for p in b.parameters()), b) for b in blocks), key=lambda x: x[0])


def block_saved_bytes(model, images) -> int:
    """The most bytes any one Swin block saves for backward during the forward of ``images`` (what its
    recomputation under activation checkpointing holds at once)."""
    import torch

    from models.swin_common import SwinBlock
    per_block = []
    state = {}

    def pre(module, args):
        state['out'] = {}
        state['hook'] = torch.autograd.graph.saved_tensors_hooks(_counter(state['out'], model), lambda t: t)
        state['hook'].__enter__()

    def post(module, args, result):
        state['hook'].__exit__(None, None, None)
        per_block.append(state['out']['bytes'])

    handles = []
    for block in (m for m in model.modules() if isinstance(m, SwinBlock)):
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return max(per_block)


def _counter(out, model):
    """A saved-tensor pack hook adding each new storage's bytes to ``out['bytes']``, parameters' storages not."""
    from torch.multiprocessing.reductions import StorageWeakRef
    seen = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    out['bytes'] = 0

    def pack(t):
        key = StorageWeakRef(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            out['bytes'] += t.untyped_storage().nbytes()
        return t
    return pack


def estimate(config, world_size: int, batch_size: int, amp_dtype: Optional[str]) -> Dict[str, Dict[str, float]]:
    """Bytes per GPU for ``ddp``, ``fsdp`` and ``fsdp_ckpt``: weights, grads, optimizer, activations, total."""
    import torch

    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    import models
    with torch.device('meta'):  # construction reads a few values (drop-path rates), which fake tensors refuse
        model = models.build_model(config).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device='cpu')
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        in_chans = model.patch_embed.in_chans
        h, w = model.img_size
        images = torch.empty(batch_size, in_chans, h, w)
        dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(amp_dtype or '')
        autocast = torch.autocast('cpu', dtype=dtype) if dtype else contextlib.nullcontext()
        compute_bytes = 2 if dtype else 4
        block_params, block = largest_block(model)
        with autocast:
            model.set_grad_checkpointing(False)
            ddp_act = saved_bytes(model, images)  # fp32 weights: autocast's low-precision weight copies count
            if dtype:  # FSDP gathers the weights in the compute dtype (param_dtype): no copies, and the gathered
                for p in model.parameters():  # weights are FSDP's (freed after use), not activations
                    p.data = p.data.to(dtype)  # (.to() on the module cannot swap these fake parameters)
            plain_act = saved_bytes(model, images)
            block_act = block_saved_bytes(model, images)
            model.set_grad_checkpointing(True)
            ckpt_act = saved_bytes(model, images) + block_act

    full = {'weights': 4 * n_params, 'grads': 4 * n_params, 'optimizer': 8 * n_params}
    gathered = 2 * compute_bytes * block_params + 4 * block_params  # 2 gathered blocks + 1 unsharded grad
    sharded = {k: v / world_size for k, v in full.items()}
    sharded['weights'] += gathered
    rows = {'ddp': dict(full, activations=ddp_act), 'fsdp': dict(sharded, activations=plain_act),
            'fsdp_ckpt': dict(sharded, activations=ckpt_act)}
    for row in rows.values():
        row['total'] = sum(row.values())
    rows['_info'] = {'params': n_params, 'block_params': block_params, 'gathered': gathered}
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cfg', required=True, help='config file of the model')
    parser.add_argument('--opts', nargs='+', default=[], help='KEY VALUE config overrides')
    parser.add_argument('--world-size', type=int, default=8, help='processes (GPUs) sharing the model (default 8)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per GPU (default 1)')
    parser.add_argument('--amp-dtype', choices=['float32', 'bfloat16', 'float16'], default='bfloat16',
                        help='compute dtype (default bfloat16; float32 = AMP off)')
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.batch_size < 1:
        parser.error('--world-size and --batch-size must be >= 1')
    from config import ConfigError, load_config
    try:
        config = load_config(args.cfg, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    amp = None if args.amp_dtype == 'float32' else args.amp_dtype
    rows = estimate(config, args.world_size, args.batch_size, amp)
    info = rows.pop('_info')
    print(f"{config.MODEL.NAME}: {info['params'] / 1e6:.1f}M parameters, {config.DATA.IMG_SIZE} px, batch "
          f"{args.batch_size} per GPU, {args.world_size} GPUs, compute {args.amp_dtype}")
    print(f"{'GiB per GPU':<22}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'total':>9}")
    names = {'ddp': 'DDP', 'fsdp': 'FSDP', 'fsdp_ckpt': 'FSDP + checkpointing'}
    for key, row in rows.items():
        print(f"{names[key]:<22}" + ''.join(f"{row[k] / GIB:9.2f}" for k in
                                            ('weights', 'grads', 'optimizer', 'activations', 'total')))
    print(f"(FSDP weights include {info['gathered'] / GIB:.2f} GiB for the largest block "
          f"({info['block_params'] / 1e6:.1f}M parameters) gathered twice and its unsharded gradient; activations "
          f"measured on fake tensors; see --help for what is not counted)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
