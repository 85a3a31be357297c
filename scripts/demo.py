#!/usr/bin/env python
"""The CPU demo behind ``make demo``: train, evaluate and fine-tune a small Swin on handwritten digits.

Steps, all through the real command line (``main.py``) and its YACS configs in ``configs/demo/``:

1. write scikit-learn's digits as an image folder (``--data-path``, default ``./demo_data``; 80/20 stratified);
2. train a small Swin at 32 px from scratch (Mixup/CutMix, random erasing, AdamW, cosine schedule with warmup,
   checkpoints, TensorBoard);
3. evaluate its last checkpoint with ``--eval --resume``;
4. fine-tune that checkpoint at 48 px with a window of 6 instead of 4 through ``--pretrained``;
5. evaluate the fine-tuned model, plot the loss/accuracy curves, and print where everything is.

Exits non-zero if a step fails or the final top-1 is below ``--min-acc``. Earlier demo runs in ``--output``
are replaced (training would otherwise auto-resume from them and stop at once).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.make_demo_data import write_digits  # noqa: E402
from scripts.plot_metrics import plot_runs  # noqa: E402

TRAIN_CFG = os.path.join(ROOT, 'configs', 'demo', 'swin_demo_digits_32.yaml')
FINETUNE_CFG = os.path.join(ROOT, 'configs', 'demo', 'swin_demo_digits_48_ft.yaml')
ACC_LINE = re.compile(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+)')


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


def run_main(args: List[str], title: str, script: str = 'main.py') -> str:
    """Run ``python <script> <args>`` from the repository root, echoing its output live; return that output."""
    command = [sys.executable, os.path.join(ROOT, script)] + args
    print(f"\n=== {title}\n$ python {script} {' '.join(args)}", flush=True)
    lines = []
    env = dict(os.environ)
    # One compute thread: this tiny model's matrices are too small to gain from more, and a second thread
    # would compete with the data-loading worker for a 2-core CPU; oversubscribed OpenMP threads spin and can
    # make a step ten times slower. Set OMP_NUM_THREADS yourself to override.
    env.setdefault('OMP_NUM_THREADS', '1')
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    if process.returncode != 0:
        raise DemoError(f"{title} failed (exit code {process.returncode}); see the output above")
    return ''.join(lines)


def last_accuracy(output: str, title: str) -> Tuple[float, float]:
    """The last `` * Acc@1 .. Acc@5 ..`` line of an evaluation's output."""
    found = ACC_LINE.findall(output)
    if not found:
        raise DemoError(f"{title}: no ' * Acc@1 .. Acc@5 ..' line in its output")
    acc1, acc5 = found[-1]
    return float(acc1), float(acc5)


def run_dir(output: str, model_name: str, tag: str = 'default') -> str:
    """Where ``main.py`` writes a run: ``<output>/<MODEL.NAME>/<TAG>``."""
    return os.path.join(output, model_name, tag)


def final_checkpoint(folder: str) -> str:
    path = os.path.join(folder, 'ckpt_last.pth')
    if not os.path.isfile(path):
        raise DemoError(f"training left no checkpoint at {path}")
    return path


def cpu_model() -> str:
    """The CPU's model name (demo times differ a lot between machines, so the summary names it)."""
    try:
        with open('/proc/cpuinfo') as f:
            info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    except (OSError, KeyError, ValueError):
        pass
    import platform
    return platform.processor() or platform.machine()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-path', default='./demo_data', help='where to write the digits images')
    parser.add_argument('--output', default='./demo_output', help='root of the run folders (logs, checkpoints)')
    parser.add_argument('--min-acc', type=float, default=95.0,
                        help='final top-1 (%%) below which the demo fails (default: 95)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda', 'auto'],
                        help='where to train (default: cpu, the point of the demo)')
    parser.add_argument('--opts', nargs='+', default=[],
                        help='extra KEY VALUE config overrides for both stages (e.g. TRAIN.EPOCHS 5)')
    args = parser.parse_args(argv)

    started = time.time()
    data_path, output = os.path.abspath(args.data_path), os.path.abspath(args.output)
    from config import load_config
    train_cfg = load_config(TRAIN_CFG, args.opts)
    finetune_cfg = load_config(FINETUNE_CFG, args.opts)
    train_dir = run_dir(output, train_cfg.MODEL.NAME)
    finetune_dir = run_dir(output, finetune_cfg.MODEL.NAME)
    common = ['--data-path', data_path, '--output', output, '--device', args.device]
    extra = ['--opts'] + list(args.opts) if args.opts else []

    try:
        print(f"=== 1/5 writing the digits data set to {data_path}", flush=True)
        counts = write_digits(data_path, size=train_cfg.DATA.IMG_SIZE)
        print(f"{counts['train']} train and {counts['val']} val images, 10 classes", flush=True)
        for name in (train_cfg.MODEL.NAME, finetune_cfg.MODEL.NAME):
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)

        run_main(['--cfg', TRAIN_CFG] + common + extra, f'2/5 training at {train_cfg.DATA.IMG_SIZE} px')
        train_ckpt = final_checkpoint(train_dir)
        acc_train = last_accuracy(
            run_main(['--cfg', TRAIN_CFG, '--eval', '--resume', train_ckpt, '--tag', 'eval'] + common + extra,
                     '3/5 evaluating the trained model'), 'evaluation')

        run_main(['--cfg', FINETUNE_CFG, '--pretrained', train_ckpt] + common + extra,
                 f'4/5 fine-tuning at {finetune_cfg.DATA.IMG_SIZE} px, window '
                 f'{finetune_cfg.MODEL.SWIN.WINDOW_SIZE} (from window {train_cfg.MODEL.SWIN.WINDOW_SIZE})')
        finetune_ckpt = final_checkpoint(finetune_dir)
        acc_finetune = last_accuracy(
            run_main(['--cfg', FINETUNE_CFG, '--eval', '--resume', finetune_ckpt, '--tag', 'eval'] + common + extra,
                     '5/5 evaluating the fine-tuned model'), 'evaluation')

        plot = plot_runs([os.path.join(train_dir, 'metrics.jsonl'), os.path.join(finetune_dir, 'metrics.jsonl')],
                         os.path.join(output, 'demo_curves.png'),
                         labels=[f'{train_cfg.DATA.IMG_SIZE} px', f'{finetune_cfg.DATA.IMG_SIZE} px fine-tune'],
                         title='Swin demo on digits')
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1

    elapsed = time.time() - started
    def rel(path: str) -> str:
        short = os.path.relpath(path)
        return path if short.startswith('..') else short
    print(f"""
=== done in {elapsed / 60:.1f} min ({elapsed:.0f} s) on {cpu_model()}, {os.cpu_count()} cores
top-1 at {train_cfg.DATA.IMG_SIZE} px:            {acc_train[0]:.2f}%  (top-5 {acc_train[1]:.2f}%)
top-1 after fine-tuning at {finetune_cfg.DATA.IMG_SIZE} px: {acc_finetune[0]:.2f}%  (top-5 {acc_finetune[1]:.2f}%)
logs:         {rel(train_dir)}/log_rank0.txt, {rel(finetune_dir)}/log_rank0.txt (evaluations: .../eval/)
checkpoints:  {rel(train_ckpt)}, {rel(finetune_ckpt)} (and ckpt_best.pth, ckpt_epoch_*.pth)
configs used: {rel(train_dir)}/config.yaml, {rel(finetune_dir)}/config.yaml
TensorBoard:  tensorboard --logdir {rel(output)}
curves:       {rel(plot)} (from each run's metrics.jsonl)
predict:      python scripts/predict.py --resume {rel(finetune_ckpt)} --data-path {rel(data_path)} \
{rel(os.path.join(data_path, 'val', 'digit_7'))}""")
    if acc_finetune[0] < args.min_acc:
        print(f"\ndemo failed: final top-1 {acc_finetune[0]:.2f}% is below --min-acc {args.min_acc}%",
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
