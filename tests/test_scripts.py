"""The user-facing scripts: --help, predict, export, weight conversion, demo data and plotting (all on CPU)."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')

from config import config_to_dict, load_config  # noqa: E402
from models import build_model  # noqa: E402
from utils.checkpoint import TrainState, build_checkpoint, save_checkpoint_file  # noqa: E402

TINY_OPTS = ['DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '3', 'MODEL.SWIN.EMBED_DIM', '16',
             'MODEL.SWIN.DEPTHS', '[1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 2]', 'MODEL.SWIN.WINDOW_SIZE', '4',
             'TEST.CROP', 'False']
CLASSES = ['cat', 'dog', 'fox']


def all_scripts():
    return sorted(f for f in os.listdir(SCRIPTS) if f.endswith(('.py', '.sh')) and not f.startswith('_'))


def test_every_script_answers_help():
    # All at once: each run is mostly Python start-up and imports, so running them side by side saves time.
    processes = {}
    for script in all_scripts():
        path = os.path.join(SCRIPTS, script)
        command = ['bash', path, '--help'] if script.endswith('.sh') else [sys.executable, path, '--help']
        processes[script] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
    failures = []
    for script, process in processes.items():
        out, err = process.communicate(timeout=180)
        if process.returncode != 0 or 'usage' not in out.lower():
            failures.append(f"{script}: exit {process.returncode}: {err.strip()[-300:]}")
    assert not failures, '\n'.join(failures)
    assert {'demo.py', 'predict.py', 'export.py', 'convert_weights.py', 'launch_multinode.sh',
            'slurm_train.sh'} <= set(processes)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny model's checkpoint (with its config inside), a dataset folder of class folders and 4 images."""
    root = tmp_path_factory.mktemp('tiny')
    config = load_config(None, TINY_OPTS)
    torch.manual_seed(0)
    model = build_model(config).eval()
    ckpt = str(root / 'ckpt.pth')
    save_checkpoint_file(build_checkpoint(TrainState(model, epoch=1), config_to_dict(config)), ckpt)
    rng = np.random.default_rng(0)
    images = root / 'images'
    for name in CLASSES:
        (root / 'data' / 'train' / name).mkdir(parents=True)
    images.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(images / f'{i}.png')
    return dict(root=root, config=config, model=model, ckpt=ckpt, images=str(images))


def test_predict_prints_topk_with_names_and_matches_the_model(tiny_run, capsys):
    from scripts import predict
    assert predict.main([tiny_run['images'], '--resume', tiny_run['ckpt'],
                         '--data-path', str(tiny_run['root'] / 'data')]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 4
    # 3 classes: top-5 shows all three, by name, most likely first, and agrees with the model itself.
    from data import build_transform
    from data.datasets import decode_image
    transform = build_transform(False, tiny_run['config'])
    for i, line in enumerate(lines):
        path, shown = line.split(': ', 1)
        assert path.endswith(f'{i}.png')
        names = [part.split()[0] for part in shown.split(', ')]
        assert sorted(names) == CLASSES
        with torch.no_grad():
            logits = tiny_run['model'](transform(decode_image(path)).unsqueeze(0))[0]
        assert names[0] == CLASSES[int(logits.argmax())]


def test_predict_with_cfg_and_class_file(tiny_run, tmp_path, capsys):
    from scripts import predict
    names = tmp_path / 'names.txt'
    names.write_text('a\nb\nc\n')
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text('MODEL:\n  NUM_CLASSES: 3\n')
    image = os.path.join(tiny_run['images'], '0.png')
    argv = [image, '--resume', tiny_run['ckpt'], '--cfg', str(cfg), '--opts'] + TINY_OPTS + \
           ['--class-names', str(names), '--topk', '2']
    assert predict.main(argv) == 0
    shown = capsys.readouterr().out.strip().split(': ', 1)[1]
    assert len(shown.split(', ')) == 2 and all(p.split()[0] in 'abc' for p in shown.split(', '))


class _Payload:
    """Something that needs arbitrary unpickling (as a malicious file would)."""


def test_predict_refuses_a_checkpoint_that_needs_unpickling(tiny_run, tmp_path, capsys):
    from scripts import predict
    bad = tmp_path / 'bad.pth'
    torch.save({'model': tiny_run['model'].state_dict(), 'payload': _Payload()}, bad, pickle_protocol=2)
    assert predict.main([tiny_run['images'], '--resume', str(bad)]) == 1
    assert 'refusing' in capsys.readouterr().err


def test_export_onnx_matches_pytorch_and_writes_safetensors(tiny_run, tmp_path, capsys):
    import onnx  # noqa: F401  (dev requirements: onnx and onnxruntime; missing ones fail, not skip)
    import onnxruntime  # noqa: F401
    from safetensors.torch import load_file
    from scripts import export
    onnx_path, st_path = tmp_path / 'm.onnx', tmp_path / 'm.safetensors'
    assert export.main(['--resume', tiny_run['ckpt'], '--onnx', str(onnx_path),
                        '--safetensors', str(st_path)]) == 0
    out = capsys.readouterr().out
    assert onnx_path.is_file() and 'not checked' not in out
    diff = float(out.split('max abs diff ')[1].split()[0])
    assert diff < 1e-3
    weights = load_file(str(st_path))
    for key, value in tiny_run['model'].state_dict().items():
        assert torch.equal(weights[key], value), key


def test_convert_weights_from_timm_loads_strictly(tmp_path, capsys):
    timm_swin = pytest.importorskip('timm.models.swin_transformer')
    from scripts import convert_weights
    from utils.checkpoint import load_checkpoint_file
    torch.manual_seed(0)
    reference = timm_swin.SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                          window_size=4, num_classes=3).eval()
    src, dst = tmp_path / 'timm.pth', tmp_path / 'official.pth'
    torch.save(reference.state_dict(), src)
    cfg = tmp_path / 'empty.yaml'
    cfg.write_text('{}\n')
    argv = [str(src), str(dst), '--from', 'timm', '--check-cfg', str(cfg), '--opts'] + TINY_OPTS
    assert convert_weights.main(argv) == 0, capsys.readouterr().err
    model = build_model(load_config(None, TINY_OPTS)).eval()
    model.load_state_dict(load_checkpoint_file(str(dst))['model'], strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_demo_data_writer_counts_and_reuse(tmp_path):
    from scripts.make_demo_data import CLASS_NAMES, count_images, write_digits
    out = str(tmp_path / 'digits')
    counts = write_digits(out, size=16, progress=False)
    assert counts == {'train': 1438, 'val': 359}  # 1797 digits, 20% of each class (rounded) in val
    assert sorted(os.listdir(os.path.join(out, 'train'))) == CLASS_NAMES
    for name in CLASS_NAMES:  # stratified: every class in both splits, about 4:1
        n_train = len(os.listdir(os.path.join(out, 'train', name)))
        n_val = len(os.listdir(os.path.join(out, 'val', name)))
        assert n_val > 0 and 3.5 < n_train / n_val < 4.5
    with Image.open(os.path.join(out, 'val', 'digit_0', os.listdir(os.path.join(out, 'val', 'digit_0'))[0])) as im:
        assert im.size == (16, 16) and im.mode == 'RGB'
    # A complete folder with the same settings is kept; a removed file is not silently "repaired".
    os.remove(os.path.join(out, 'val', 'digit_0', os.listdir(os.path.join(out, 'val', 'digit_0'))[0]))
    assert write_digits(out, size=16, progress=False) == {'train': 1438, 'val': 358}
    assert write_digits(out, size=16, progress=False, force=True) == count_images(out) == \
        {'train': 1438, 'val': 359}


def test_plot_metrics_writes_png_and_rejects_bad_records(tmp_path):
    from scripts.plot_metrics import plot_runs
    run = tmp_path / 'run'
    run.mkdir()
    with open(run / 'metrics.jsonl', 'w') as f:
        for epoch in range(3):
            f.write(json.dumps(dict(epoch=epoch, train_loss=2.0 - epoch, val_acc1=50.0 + epoch, val_acc5=90.0,
                                    val_loss=1.5, lr=1e-3)) + '\n')
        f.write('{"epoch": 3, "train_lo')  # cut short by a crash: ignored
    png = plot_runs([str(run / 'metrics.jsonl'), str(run)], str(tmp_path / 'curves.png'))
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.size[0] > 100
    (tmp_path / 'bad.jsonl').write_text('{"epoch": 0}\n')
    with pytest.raises(ValueError, match='missing keys'):
        plot_runs([str(tmp_path / 'bad.jsonl')], str(tmp_path / 'x.png'))


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHON=sys.executable)
    result = subprocess.run(['bash', 'scripts/gpu_check.sh'], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'no CUDA device' in result.stdout
