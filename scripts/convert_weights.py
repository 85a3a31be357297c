#!/usr/bin/env python
"""Convert a timm or torchvision Swin state dict into an official-format checkpoint ``{'model': ...}``.

The result loads with ``--pretrained`` (fine-tuning, any resolution/window/head) or ``--resume`` (same
architecture), and with ``model.load_state_dict(torch.load(out, weights_only=True)['model'])``.

    python scripts/convert_weights.py --from timm swin_tiny_patch4_window7_224.pth swin_tiny_official.pth
    python scripts/convert_weights.py --from torchvision swin_t-704ceda3.pth swin_t_official.pth \\
        --check-cfg configs/swin/swin_tiny_patch4_window7_224.yaml

Input files are read with ``weights_only=True`` (or as ``.safetensors``); a file wrapping its weights in
``'model'`` / ``'state_dict'`` is unwrapped first.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SOURCES = ('timm', 'torchvision')


def convert_file(src: str, dst: str, source: str, check_cfg: str | None = None,
                 opts: Sequence[str] = ()) -> int:
    """Convert ``src`` (a ``source`` state dict) into the checkpoint ``dst``; return the tensor count.

    With ``check_cfg`` the converted weights must load strictly into the model that config builds.
    """
    # Imported here so that --help is instant.
    from models.convert import timm_to_official, torchvision_to_official
    from models.pretrained import extract_state_dict
    from utils.checkpoint import load_checkpoint_file, save_checkpoint_file

    converters = {'timm': timm_to_official, 'torchvision': torchvision_to_official}
    if source not in converters:
        raise ValueError(f"--from {source!r} is not one of {list(SOURCES)}")
    state = extract_state_dict(load_checkpoint_file(src))
    converted = {k: v.contiguous() for k, v in converters[source](state).items()}
    if check_cfg:
        from config import load_config
        from models import build_model
        from utils.checkpoint import load_model_state
        model = build_model(load_config(check_cfg, opts))
        load_model_state(model, {'model': converted}, src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_checkpoint_file({'model': converted}, dst)
    return len(converted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='timm / torchvision state dict (.pth, .bin or .safetensors)')
    parser.add_argument('dst', help='official-format checkpoint to write ({"model": state_dict})')
    parser.add_argument('--from', dest='source', required=True, choices=SOURCES,
                        help='where the weights come from')
    parser.add_argument('--check-cfg', metavar='FILE',
                        help='a config (e.g. configs/swin/swin_tiny_patch4_window7_224.yaml) whose model must '
                             'load the converted weights strictly')
    parser.add_argument('--opts', nargs='+', default=[], help='KEY VALUE pairs for --check-cfg')
    args = parser.parse_args(argv)
    try:
        count = convert_file(args.src, args.dst, args.source, args.check_cfg, args.opts)
    except Exception as e:  # a bad file or mismatch: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {count} tensors in the official layout"
          + (f", checked against {args.check_cfg}" if args.check_cfg else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
