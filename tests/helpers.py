"""Helpers shared by the end-to-end tests: a small real image folder and a quiet subprocess environment."""
import os
import subprocess

import numpy as np
from PIL import Image


def write_digits_folder(root, classes: int = 4, train_per_class: int = 16, val_per_class: int = 8,
                        size: int = 32, colour: bool = False, ext: str = 'png') -> str:
    """scikit-learn's digits as ``root/{train,val}/digit<c>/<i>.<ext>`` (``size`` px RGB), first images per class.
    Default: grey digits in all three channels, nearest-neighbour PNGs. ``colour``: three different channels (so
    colour matters), bicubic, and a JPEG of quality 90 named ``<i:04d>.jpg`` (``ext='jpg'``)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    wanted = {'train': train_per_class, 'val': val_per_class}
    counts = {(split, c): 0 for split in wanted for c in range(classes)}
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        if label >= classes:
            continue
        split = 'train' if counts[('train', label)] < train_per_class else 'val'
        if counts[(split, label)] >= wanted[split]:
            continue
        counts[(split, label)] += 1
        folder = os.path.join(str(root), split, f'digit{label}')
        os.makedirs(folder, exist_ok=True)
        pixels = (img / 16.0 * 255).astype(np.uint8)
        if colour:
            rgb = np.stack([pixels, pixels[::-1], 255 - pixels], -1)
            image = Image.fromarray(rgb).resize((size, size), Image.BICUBIC)
        else:
            image = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert('RGB')
        if ext == 'jpg':
            image.save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)
        else:
            image.save(os.path.join(folder, f'{i}.{ext}'))
    return str(root)


PHOTOS = ('camera', 'astronaut', 'coffee', 'chelsea')  # scikit-image's photographs, one class each


def photo_crops(per_class: int, seed: int, crop=(72, 56), photos=PHOTOS):
    """(RGB uint8 (h, w, 3) array, label) pairs: random crops of h x w px of each of scikit-image's ``photos``
    (label = its place in ``photos``), halved in size."""
    from skimage import data as skdata
    from skimage.color import gray2rgb
    rng = np.random.default_rng(seed)
    out = []
    for label, name in enumerate(photos):
        photo = getattr(skdata, name)()
        photo = gray2rgb(photo) if photo.ndim == 2 else photo[:, :, :3]
        small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2)))
        for _ in range(per_class):
            top = rng.integers(0, small.shape[0] - crop[0])
            left = rng.integers(0, small.shape[1] - crop[1])
            out.append((small[top:top + crop[0], left:left + crop[1]].copy(), label))
    return out


def write_photo_jpeg_folder(root, train_per_class: int = 8, val_per_class: int = 4) -> str:
    """``root/{train,val}/<photo>/<i:04d>.jpg``: JPEGs (quality 90) of 72 x 56 px crops of scikit-image's
    photographs, one photograph a class (``PHOTOS``); train and val crops drawn with different seeds."""
    for split, n, seed in (('train', train_per_class, 0), ('val', val_per_class, 1)):
        for i, (pixels, label) in enumerate(photo_crops(n, seed)):
            folder = os.path.join(str(root), split, PHOTOS[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)
    return str(root)


def torchrun_worker_pids(parent: int) -> dict:
    """{RANK: pid} of the processes started by the torchrun process ``parent`` (read from /proc: Linux only)."""
    found = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f'/proc/{entry}/environ', 'rb') as f:
                env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
            found[int(env[b'RANK'])] = int(entry)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def subprocess_env() -> dict:
    """One compute thread per process, and no torchrun variables leaking in from the test runner."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        env.pop(name, None)
    return env


def run_side_by_side(commands, cwd: str, timeout: float = 600) -> list:
    """Run independent commands at once (each with subprocess_env's one compute thread) and return their
    ``subprocess.CompletedProcess`` results in order: on a 2-core CI machine two one-thread runs take about the
    time of one, and most of a run is Python start-up and one-thread steps."""
    processes = [subprocess.Popen(list(command), cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for command in commands]
    results = []
    try:
        for command, process in zip(commands, processes):
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(list(command), process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


# ----------------------------------------------------------------------------- validation with known answers

# Where each sample's true label ranks among the 10 classes (0 = the top score). 13 samples: 4 top-1 hits, 10 in
# the top 5, and 3 at rank 1 (what a top-2 count would add to top-1) and 1 at rank 5 (what a top-6 count would
# add to top-5).
TRUE_LABEL_RANKS = [0, 1, 0, 4, 5, 2, 0, 9, 1, 3, 6, 0, 1]
KNOWN_CLASSES = 10
SCORES = [3.0 - 0.5 * k for k in range(KNOWN_CLASSES)]  # distinct, descending: SCORES[r] is the r-th best


def known_figures(ranks) -> tuple:
    """(top-1 %, top-5 %, mean cross-entropy) of samples whose true labels rank ``ranks``, worked out by hand:
    a row's CE is log(sum(exp(SCORES))) - SCORES[rank]."""
    import math
    log_norm = math.log(sum(math.exp(s) for s in SCORES))
    n = len(ranks)
    return (100.0 * sum(r == 0 for r in ranks) / n, 100.0 * sum(r < 5 for r in ranks) / n,
            sum(log_norm - SCORES[r] for r in ranks) / n)


def known_logits_case():
    """(images (13, 3, 2, 2), targets (13,), logits (13, 10), (acc1 %, acc5 %, mean CE loss)) with the answers
    worked out here, not by the code under test: image i holds the value i, and ``fixed_logits_model`` maps it to
    row i of ``logits``, whose target class ranks ``TRUE_LABEL_RANKS[i]``."""
    import random

    import torch
    rng = random.Random(0)
    n, c = len(TRUE_LABEL_RANKS), KNOWN_CLASSES
    logits, targets = [], []
    for i, rank in enumerate(TRUE_LABEL_RANKS):
        target = (3 * i) % c
        others = [k for k in range(c) if k != target]
        rng.shuffle(others)
        order = others[:rank] + [target] + others[rank:]  # order[r]: the class with the r-th best score
        row = [0.0] * c
        for r, cls in enumerate(order):
            row[cls] = SCORES[r] + 0.01 * i  # a shift per row changes neither ranks nor CE
        logits.append(row)
        targets.append(target)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return images, torch.tensor(targets), torch.tensor(logits), known_figures(TRUE_LABEL_RANKS)


def fixed_logits_model(logits):
    """A module returning ``logits[i]`` for an image holding the value i (one parameter, so it has a device)."""
    import torch

    class FixedLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer('table', logits.clone())
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            return self.table[images[:, 0, 0, 0].long()]
    return FixedLogits()


# ----------------------------------------------------------------------------- EMA against recorded weights

class RecordedUpdates:
    """Every optimizer's parameters (float64 full copies, by name) before its first step and after each step, from
    torch's global optimizer step hooks: what ``engine.run`` trained, seen from outside the engine. Under FSDP the
    shards are gathered (``full_tensor``, a collective: every rank steps, so every rank runs the hook)."""

    def __init__(self):
        self.weights = []  # [initial, after update 1, ..., after update N]

    def _snapshot(self, optimizer):
        out = {}
        for group in optimizer.param_groups:
            for name, p in zip(group['param_names'], group['params']):
                value = p.detach()
                out[name] = (value.full_tensor() if hasattr(value, 'full_tensor') else value).double().clone()
        return out

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(optimizer, args, kwargs):
            if not self.weights:
                self.weights.append(self._snapshot(optimizer))

        def post(optimizer, args, kwargs):
            self.weights.append(self._snapshot(optimizer))
        self.handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def closed_form_ema(weights, decay: float) -> dict:
    """The EMA after N updates of ``weights`` = [w_0, w_1, ..., w_N] as timm's ModelEmaV3 keeps it when told the
    update index (``ema.update(model, step=k)``, as the engine does): step 1 has decay 0 (the EMA starts from the
    first update's weights), later steps ``decay``; so EMA_N = d^(N-1) w_1 + sum_{k=2..N} (1 - d) d^(N-k) w_k."""
    n = len(weights) - 1
    coefficients = {1: decay ** (n - 1), **{k: (1 - decay) * decay ** (n - k) for k in range(2, n + 1)}}
    return {name: sum(c * weights[k][name] for k, c in coefficients.items()) for name in weights[0]}


# ----------------------------------------------------------------------------- evaluation without the engine

def folder_images(split_dir: str):
    """(PIL RGB image, label) of every file of ``split_dir/<class>/``, classes numbered in sorted order."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(split_dir, name))):
            with Image.open(os.path.join(split_dir, name, file)) as img:
                yield img.convert('RGB'), label


def plain_accuracy(weights: dict, opts, images, cfg_file=None) -> tuple:
    """(top-1 %, top-5 %, mean CE, count) of the model of ``load_config(cfg_file, opts)`` with ``weights`` over
    ``images`` ((PIL image, label) pairs), one image at a time through ``data.build_transform(False, config)``:
    an evaluation that shares no code with ``engine.validate``, to compare ``--eval`` with."""
    import torch

    import data
    import models
    from config import load_config
    config = load_config(cfg_file, list(opts))
    model = models.build_model(config)
    model.load_state_dict(weights)
    model.eval()
    transform = data.build_transform(False, config)
    top1 = top5 = 0
    loss = 0.0
    n = 0
    with torch.no_grad():
        for img, label in images:
            logits = model(transform(img)[None]).double()[0]  # (classes,)
            rank = int((logits > logits[label]).sum())  # how many classes score above the true one
            top1 += rank == 0
            top5 += rank < 5
            loss += float(torch.logsumexp(logits, 0) - logits[label])
            n += 1
    return 100.0 * top1 / n, 100.0 * top5 / n, loss / n, n


def parse_eval_line(text: str) -> tuple:
    """(acc1, acc5, loss) from the last `` * Acc@1 a Acc@5 b loss c`` line of a log or output."""
    import re
    found = re.findall(r' \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)', text)
    assert found, text[-3000:]
    return tuple(float(v) for v in found[-1])


# ----------------------------------------------------------------------------- parameter counts by hand

def swin_block_parameter_count(model_type: str, d: int, heads: int, window: int, mlp_ratio: int = 4,
                               cpb_hidden: int = 512) -> int:
    """Parameters of one official Swin block of width ``d`` (``window``: the one it uses, after shrinking).

    Two LayerNorms (4d), qkv (3d^2; V1 with a 3d bias, V2 with q and v biases, 2d), proj (d^2 + d), the MLP
    (2 r d^2 + r d + d); V1 adds its relative position bias table ((2w - 1)^2 h), V2 its logit scales (h) and
    the continuous position-bias MLP (2 -> 512 with bias -> h, no bias). Swin-MLP (``swin_mlp``) has no attention:
    its spatial MLP is a grouped kernel-1 conv over ``h * w^2`` channels (``h`` matrices of ``w^2 x w^2``, bias)."""
    if model_type == 'swin_mlp':
        n = window * window
        return 4 * d + 2 * mlp_ratio * d * d + mlp_ratio * d + d + heads * n * n + heads * n
    block = 4 * d + 4 * d * d + d + 2 * mlp_ratio * d * d + mlp_ratio * d + d
    if model_type == 'swinv2':
        return block + 2 * d + heads + (2 * cpb_hidden + cpb_hidden + cpb_hidden * heads)
    return block + 3 * d + (2 * window - 1) ** 2 * heads


def swin_parameter_count(model_type, embed_dim, depths, num_heads, window, img_size, num_classes,
                         patch=4, in_chans=3) -> int:
    """Parameters of an official Swin V1 / V2 classifier in closed form, from the architecture alone: patch
    embedding (conv + LayerNorm), the blocks (``swin_block_parameter_count``; V1's window shrinks to a stage's
    resolution when that is smaller), patch merging after every stage but the last (a 4d -> 2d reduction
    without bias and a LayerNorm over 4d (V1, before) or 2d (V2, after)), the final LayerNorm and the head."""
    n = in_chans * patch * patch * embed_dim + embed_dim + 2 * embed_dim
    resolution = img_size // patch
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        d = embed_dim * 2 ** i
        n += depth * swin_block_parameter_count(model_type, d, heads, min(window, resolution))
        if i < len(depths) - 1:
            n += 8 * d * d + (2 * 2 * d if model_type == 'swinv2' else 2 * 4 * d)
            resolution //= 2
    d = embed_dim * 2 ** (len(depths) - 1)
    return n + 2 * d + d * num_classes + num_classes


def float_resize_of_each_image(images, plan, height: int, width: int):
    """The reference for the gpu loader's batched resize: torchvision's float32 resize of each image of ``plan``
    (``data.gpu.BatchPlan``) to ``height x width``, its crop or eval box and flip, in the plan's order (uint8)."""
    import torch
    from torchvision.transforms.v2 import functional as F2

    import data.gpu
    want = torch.empty((len(plan.order), images[0].shape[0], height, width), dtype=torch.uint8)
    for k, b in enumerate(plan.order):
        p = plan.plans[b]
        mode = data.gpu._INTERPOLATIONS[p['interpolation']]
        if 'eval' in p:
            (rh, rw), (top, left) = p['eval']
            img, size, box = images[b], [rh, rw], (top, left)
        else:
            i, j, h, w = p['crop']
            img, size, box = images[b][:, i:i + h, j:j + w], [height, width], (0, 0)
        x = F2.resize(img.float(), size, interpolation=mode, antialias=True).clamp_(0, 255).round_()
        x = x[:, box[0]:box[0] + height, box[1]:box[1] + width].to(torch.uint8)
        want[k] = x.flip(-1) if p.get('flip') else x
    return want
