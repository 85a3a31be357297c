#!/usr/bin/env python
"""SimMIM on a CPU in a few minutes: masked-image pre-training of a small Swin, then its fine-tune.

Steps, all through the official-style entry points and the YACS configs in ``configs/demo/``:

1. write scikit-learn's digits as an image folder (``--data-path``, default ``./demo_data``; 80/20 stratified);
2. pre-train a small Swin V1 with SimMIM on the training images (labels unused) with ``main_simmim_pt.py``, and
   print the masked-pixel L1 loss of every epoch (from the run's ``metrics.jsonl``);
3. write ``simmim_reconstruction.png``: validation digits, the same digits masked as in pre-training, and the
   model's reconstruction (the visible pixels pasted back, as the loss only scores masked ones);
4. fine-tune the pre-trained encoder as a 10-class classifier with ``main_simmim_ft.py --pretrained`` (the
   official layer-wise learning-rate decay) and print its top-1 on the validation images.

Exits non-zero if a step fails, if the pre-training loss did not fall, or if the top-1 is below ``--min-acc``.
Earlier demo runs in ``--output`` are replaced (training would otherwise auto-resume from them and stop at once).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.demo import DemoError, cpu_model, final_checkpoint, last_accuracy, run_dir, run_main  # noqa: E402
from scripts.make_demo_data import write_digits  # noqa: E402

PRETRAIN_CFG = os.path.join(ROOT, 'configs', 'demo', 'simmim_pretrain_digits_32.yaml')
FINETUNE_CFG = os.path.join(ROOT, 'configs', 'demo', 'simmim_finetune_digits_32.yaml')


def epoch_losses(folder: str) -> List[float]:
    """The mean training loss of each epoch, from the run's ``metrics.jsonl``."""
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise DemoError(f"pre-training wrote no {path}")
    with open(path) as f:
        return [json.loads(line)['train_loss'] for line in f if line.strip()]


def write_reconstructions(config_file: str, checkpoint: str, image_folder: str, out: str, count: int = 8,
                          seed: int = 0) -> float:
    """Plot ``count`` images of ``image_folder`` (one per class first) as input / masked input / reconstruction
    rows into ``out``; returns the masked-pixel L1 loss of the model on them (normalised units, as training).

    Masks come from the pre-training mask generator (``DATA.MASK_PATCH_SIZE``, ``DATA.MASK_RATIO``) with a fixed
    numpy seed; the images are only normalised (no random crop), so the figure shows the model, not the
    augmentation.
    """
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from PIL import Image
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    import models
    from config import load_config
    from data.simmim import MaskGenerator
    from utils.checkpoint import load_checkpoint_file

    config = load_config(config_file)
    model = models.build_model(config, is_pretrain=True)
    model.load_state_dict(load_checkpoint_file(checkpoint)['model'])
    model.eval()

    classes = sorted(os.listdir(image_folder))
    paths = []
    for i in range(count):  # round-robin over the classes: digit 0, 1, 2, ...
        files = sorted(os.listdir(os.path.join(image_folder, classes[i % len(classes)])))
        paths.append(os.path.join(image_folder, classes[i % len(classes)], files[i // len(classes)]))
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    to_tensor = transforms.Compose([transforms.Resize((config.DATA.IMG_SIZE,) * 2), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    x = torch.stack([to_tensor(Image.open(p).convert('RGB')) for p in paths])  # (N, 3, H, W) normalised
    np.random.seed(seed)  # the generator draws from numpy's global state, as the official one
    generator = MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, model.patch_size,
                              config.DATA.MASK_RATIO)
    mask = torch.stack([torch.from_numpy(generator()) for _ in paths])  # (N, H/p, W/p), 1 = masked
    with torch.no_grad():
        loss = float(model(x, mask))
        recon = model.decoder(model.encoder(x, mask).contiguous())[..., :x.shape[-2], :x.shape[-1]]  # (N, 3, H, W)
    pixel_mask = mask.repeat_interleave(model.patch_size, 1).repeat_interleave(model.patch_size, 2)
    pixel_mask = pixel_mask.unsqueeze(1).float()  # (N, 1, H, W)

    def show(t: torch.Tensor) -> np.ndarray:  # normalised (N, 3, H, W) -> displayable (N, H, W, 3) in [0, 1]
        return (t * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    grey = torch.zeros_like(x)  # 0 after normalisation: the mean colour marks the masked cells
    columns = {'input': show(x), 'masked input': show(x * (1 - pixel_mask) + grey * pixel_mask),
               'reconstruction': show(recon * pixel_mask + x * (1 - pixel_mask))}
    fig, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.6 * count))
    for col, (title, images) in enumerate(columns.items()):
        axes[0, col].set_title(title, fontsize=9)
        for row in range(count):
            axes[row, col].imshow(images[row], interpolation='nearest')
            axes[row, col].axis('off')
    fig.suptitle(f'SimMIM, masked-pixel L1 {loss:.3f}', fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return loss


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-path', default='./demo_data', help='where to write the digits images')
    parser.add_argument('--output', default='./demo_output', help='root of the run folders (logs, checkpoints)')
    parser.add_argument('--pretrain-epochs', type=int, default=None, help='override the pre-training epochs')
    parser.add_argument('--finetune-epochs', type=int, default=None, help='override the fine-tune epochs')
    parser.add_argument('--min-acc', type=float, default=0.0,
                        help='fine-tune top-1 (%%) below which the demo fails (default: 0, report only)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda', 'auto'],
                        help='where to train (default: cpu, the point of the demo)')
    args = parser.parse_args(argv)

    started = time.time()
    data_path, output = os.path.abspath(args.data_path), os.path.abspath(args.output)
    from config import load_config
    pt_cfg, ft_cfg = load_config(PRETRAIN_CFG), load_config(FINETUNE_CFG)
    pt_dir, ft_dir = run_dir(output, pt_cfg.MODEL.NAME), run_dir(output, ft_cfg.MODEL.NAME)
    common = ['--output', output, '--device', args.device]
    pt_opts = ['--opts', 'TRAIN.EPOCHS', str(args.pretrain_epochs)] if args.pretrain_epochs else []
    ft_opts = ['--opts', 'TRAIN.EPOCHS', str(args.finetune_epochs)] if args.finetune_epochs else []
    png = os.path.join(output, 'simmim_reconstruction.png')

    try:
        print(f"=== 1/4 writing the digits data set to {data_path}", flush=True)
        counts = write_digits(data_path, size=pt_cfg.DATA.IMG_SIZE)
        print(f"{counts['train']} train and {counts['val']} val images, 10 classes", flush=True)
        for name in (pt_cfg.MODEL.NAME, ft_cfg.MODEL.NAME):
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)

        run_main(['--cfg', PRETRAIN_CFG, '--data-path', os.path.join(data_path, 'train')] + common + pt_opts,
                 '2/4 SimMIM pre-training (masked-image modelling, labels unused)', script='main_simmim_pt.py')
        pt_ckpt = final_checkpoint(pt_dir)
        losses = epoch_losses(pt_dir)
        print("\nmasked-pixel L1 loss per epoch (mean over the epoch's updates):")
        for epoch, value in enumerate(losses):
            print(f"  epoch {epoch:3d}: {value:.4f}")

        print(f"\n=== 3/4 reconstructions of validation digits -> {png}", flush=True)
        val_loss = write_reconstructions(PRETRAIN_CFG, pt_ckpt, os.path.join(data_path, 'val'), png)
        print(f"masked-pixel L1 loss on the plotted validation digits: {val_loss:.4f}")

        out = run_main(['--cfg', FINETUNE_CFG, '--data-path', data_path, '--pretrained', pt_ckpt] + common + ft_opts,
                       '4/4 fine-tuning the pre-trained encoder as a classifier (layer-wise lr decay)',
                       script='main_simmim_ft.py')
        acc1, acc5 = last_accuracy(out, 'fine-tune')
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1

    elapsed = time.time() - started
    print(f"""
=== done in {elapsed / 60:.1f} min ({elapsed:.0f} s) on {cpu_model()}, {os.cpu_count()} cores
pre-training loss: {losses[0]:.4f} (epoch 0) -> {losses[-1]:.4f} (epoch {len(losses) - 1})
reconstructions:   {png}
fine-tune top-1:   {acc1:.2f}%  (top-5 {acc5:.2f}%) after {len(epoch_losses(ft_dir))} epochs
logs:              {pt_dir}/log_rank0.txt, {ft_dir}/log_rank0.txt""")
    if not losses[-1] < losses[0]:
        print(f"\ndemo failed: the pre-training loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})",
              file=sys.stderr)
        return 1
    if acc1 < args.min_acc:
        print(f"\ndemo failed: top-1 {acc1:.2f}% is below --min-acc {args.min_acc}%", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
