"""YACS configuration: every key of the official Swin repository with its official default, plus ours.

Official keys keep their names and defaults so that official YAML files and ``--opts`` lines work as they
are. Keys that the official code does not have are marked ``(ours)``.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


_LOG = logging.getLogger(__name__)


_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128                 # per process
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'             # imagenet | imagenet22K | folder (ours: any class count) | wds (ours:
                                         # WebDataset tar shards) | hf (ours: a Hugging Face dataset)
_C.DATA.IMG_SIZE = 224                   # an int (square) or (ours) [height, width]: see img_size_hw
_C.DATA.INTERPOLATION = 'bicubic'        # random | bilinear | bicubic | nearest
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'              # no | part | full
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.MASK_PATCH_SIZE = 32             # SimMIM keys, kept so official files parse
_C.DATA.MASK_RATIO = 0.6
_C.DATA.PERSISTENT_WORKERS = True        # (ours)
_C.DATA.PREFETCH_FACTOR = 2              # (ours)
_C.DATA.REPEATED_AUG = 0                 # (ours) repeats of each image per epoch; 0 or 1 = off
_C.DATA.STRICT_IMAGES = False            # (ours) an unreadable image is an error instead of a skip
_C.DATA.TRAIN_SPLIT = 'train'            # (ours) folder / zip prefix of the training split
_C.DATA.VAL_SPLIT = 'val'                # (ours); for wds also a brace pattern, e.g. 'val-{000000..000063}.tar'
_C.DATA.HF_IMAGE_COLUMN = 'image'        # (ours) DATA.DATASET hf: the column holding the images (an Image feature)
_C.DATA.HF_LABEL_COLUMN = 'label'        # (ours) DATA.DATASET hf: the column holding the integer labels
_C.DATA.WDS_SHUFFLE = 1000               # (ours) DATA.DATASET wds: shuffle buffer, in samples per data worker
_C.DATA.MEAN = []                        # (ours) per-channel normalisation mean (0..1 scale); [] = default_mean_std
_C.DATA.STD = []                         # (ours) per-channel std; [] = default_mean_std; both: MODEL.*.IN_CHANS long
_C.DATA.LOADER = 'auto'                  # (ours) auto: fast for training where it can run, else torch, and
                                         # torch for evaluation (data.build.choose_loaders; docs/DATA.md) |
                                         # torch: timm transforms, float batches (the official pixels) | fast: uint8
                                         # on the CPU, normalise + erasing on the device | gpu: decode + augment on
                                         # the device
_C.DATA.LABELS = 'source'                # (ours) source: the dataset's own single label per image | csv: several
                                         # labels per image (multi-label) from <DATA_PATH>/<split>.csv (docs/DATA.md)

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'swin'                   # swin | swinv2 | swin_mlp | swin_moe
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
_C.MODEL.PRETRAINED = ''
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.FAST_PATHS = True               # (ours) the speed tricks of models/ (models/fast_paths.py); False, or the
                                         # environment SWIN_FAST_PATHS=0: the official computation everywhere
_C.MODEL.FAST_PATHS_SELECT = 'measure'   # (ours) which named fast paths run (models/fast_paths.py PATHS) with
                                         # MODEL.FAST_PATHS on: measure = timed once per machine/torch/shape on the
                                         # CPU (cached, recorded in checkpoints; CUDA: all), all = every one, none =
                                         # none of them (the structural ones stay; MODEL.FAST_PATHS False: nothing)
_C.MODEL.FUSED_ATTN = True               # (ours) with MODEL.FAST_PATHS: SDPA attention (on CPU while training, the
                                         # matmul attention on contiguous heads); False: the matmul attention

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True

_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]

# Official keys of model families this framework does not build (MoE, MLP, SimMIM): kept so that their
# files parse, and rejected with a clear message by build_model.
_C.MODEL.SWIN_MOE = CN()
_C.MODEL.SWIN_MOE.PATCH_SIZE = 4
_C.MODEL.SWIN_MOE.IN_CHANS = 3
_C.MODEL.SWIN_MOE.EMBED_DIM = 96
_C.MODEL.SWIN_MOE.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MOE.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MOE.WINDOW_SIZE = 7
_C.MODEL.SWIN_MOE.MLP_RATIO = 4.
_C.MODEL.SWIN_MOE.QKV_BIAS = True
_C.MODEL.SWIN_MOE.QK_SCALE = None
_C.MODEL.SWIN_MOE.APE = False
_C.MODEL.SWIN_MOE.PATCH_NORM = True
_C.MODEL.SWIN_MOE.MLP_FC2_BIAS = True
_C.MODEL.SWIN_MOE.INIT_STD = 0.02
_C.MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
_C.MODEL.SWIN_MOE.MOE_BLOCKS = [[-1], [-1], [-1], [-1]]
_C.MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS = 1
_C.MODEL.SWIN_MOE.TOP_VALUE = 1
_C.MODEL.SWIN_MOE.CAPACITY_FACTOR = 1.25
_C.MODEL.SWIN_MOE.COSINE_ROUTER = False
_C.MODEL.SWIN_MOE.NORMALIZE_GATE = False
_C.MODEL.SWIN_MOE.USE_BPR = True
_C.MODEL.SWIN_MOE.IS_GSHARD_LOSS = False
_C.MODEL.SWIN_MOE.GATE_NOISE = 1.0
_C.MODEL.SWIN_MOE.COSINE_ROUTER_DIM = 256
_C.MODEL.SWIN_MOE.COSINE_ROUTER_INIT_T = 0.5
_C.MODEL.SWIN_MOE.MOE_DROP = 0.0
_C.MODEL.SWIN_MOE.AUX_LOSS_WEIGHT = 0.01

_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True

_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0                 # max grad norm; 0 or None: no clipping (norm still logged)
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'    # cosine | linear | step | multistep
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'        # adamw | sgd | fused_adam | fused_lamb (apex)
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

_C.TRAIN.LAYER_DECAY = 1.0

_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False         # Swin-MoE: rank 0 saves <name>.pth.global, every rank resumes from it

_C.TRAIN.EMA = CN()                      # (ours) model EMA through timm's ModelEmaV3
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998
_C.TRAIN.EMA.WARMUP = False
_C.TRAIN.MAX_NONFINITE_STEPS = 20        # (ours) stop after this many non-finite losses in a row
_C.TRAIN.SAVE_EVERY_STEPS = 0            # (ours) mid-epoch checkpoint every N optimizer updates; 0 = off
_C.TRAIN.KEEP_CHECKPOINTS = 3            # (ours) keep the last K epoch checkpoints (plus best and last)
_C.TRAIN.LOSS = 'ce'                     # (ours) ce: softmax cross-entropy (official) | bce: timm's
                                         # BinaryCrossEntropy (timm's --bce-loss); DATA.LABELS csv needs bce

# (ours) Parameters that do not train (README 'Freezing'): requires_grad False before the optimizer and DDP/FSDP
# are built, so they get no gradient, no optimizer state and no all-reduce. TRAIN.FREEZE: fnmatch globs over the
# parameter names of model.named_parameters() (no DDP 'module.' prefix); a pattern also covers everything under
# it, i.e. P freezes the names matching P or P.*: 'patch_embed', 'layers.0' (not layers.10), 'layers.*.norm*'.
# Each must match some parameter. TRAIN.LINEAR_PROBE: freeze all but the classification head ('head.*').
_C.TRAIN.FREEZE = []
_C.TRAIN.LINEAR_PROBE = False

_C.TRAIN.FSDP = CN()                     # (ours) sharded data parallel (torch FSDP2) and sharded checkpoints
_C.TRAIN.FSDP.ENABLE = False             # --fsdp; 1 process or torchrun with N
_C.TRAIN.FSDP.CPU_OFFLOAD = False        # shards, gradients and optimizer state live in host memory
_C.TRAIN.FSDP.RESHARD_AFTER_FORWARD = True  # free gathered block weights after forward (re-gather in backward)

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'              # batch | pair | elem
_C.AUG.RRC_SCALE = [0.08, 1.0]           # (ours) area range of the random-resized crop (images > 32 px)
_C.AUG.HFLIP = 0.5                       # (ours) horizontal flip probability

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False
_C.TEST.THRESHOLD = 0.5                  # (ours) multi-label: a class is predicted when sigmoid(logit) >= this

# ----------------------------------------------------------------------------- misc
_C.ENABLE_AMP = False                    # legacy, ignored (LEGACY_KEYS)
_C.AMP_ENABLE = True
_C.AMP_OPT_LEVEL = ''                    # apex: O0 | O1 | O2; '' = torch.amp
_C.AMP_DTYPE = 'auto'                    # (ours) auto (fp16 on CUDA, bf16 on CPU) | float16 | bfloat16
_C.DEVICE = 'auto'                       # (ours) auto | cpu | cuda
_C.COMPILE = False                       # (ours) torch.compile the model
_C.TF32 = True                           # (ours) fp32 matmuls/convolutions on CUDA use TF32 tensor cores
_C.DIST_TIMEOUT = 60                     # (ours) minutes a collective may wait for a slow rank (checkpoint writes)
_C.DETERMINISTIC = False                 # (ours) deterministic algorithms (bit-exact resume on CPU)
_C.TRUST_CHECKPOINTS = False             # (ours) allow full unpickling of trusted legacy checkpoint files
_C.TENSORBOARD = True                    # (ours)
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0                        # legacy, ignored (LEGACY_KEYS)
_C.FUSED_WINDOW_PROCESS = False          # legacy, ignored (LEGACY_KEYS)
_C.FUSED_LAYERNORM = False               # apex FusedLayerNorm when importable (models.build.layer_norm_class)

# ----------------------------------------------------------------------------- experiment trackers (ours)
# Rank 0 logs the same scalars as TensorBoard (TENSORBOARD) to each enabled tracker, plus the resolved config;
# the tracker's run id is kept in the checkpoint, so a resumed run continues the same tracker run
# (utils/trackers.py). Neither package is needed unless enabled.
_C.LOGGER = CN()
_C.LOGGER.WANDB = CN()
_C.LOGGER.WANDB.ENABLE = False           # Weights & Biases (pip install wandb)
_C.LOGGER.WANDB.PROJECT = ''             # '' = WANDB_PROJECT, else wandb's default
_C.LOGGER.WANDB.ENTITY = ''              # '' = WANDB_ENTITY, else your default entity
_C.LOGGER.WANDB.NAME = ''                # display name; '' = <MODEL.NAME>/<TAG>
_C.LOGGER.WANDB.MODE = ''                # '' = WANDB_MODE, else online | online | offline | disabled
_C.LOGGER.MLFLOW = CN()
_C.LOGGER.MLFLOW.ENABLE = False          # MLflow (pip install mlflow, or mlflow-skinny for the client only)
_C.LOGGER.MLFLOW.TRACKING_URI = ''       # '' = MLFLOW_TRACKING_URI, else MLflow's default; e.g. http://host:5000,
                                         # sqlite:///mlflow.db, file:///path/mlruns
_C.LOGGER.MLFLOW.EXPERIMENT = ''         # experiment name; '' = MLFLOW_EXPERIMENT_NAME, else 'Default'
_C.LOGGER.MLFLOW.RUN_NAME = ''           # '' = <MODEL.NAME>/<TAG>

# ----------------------------------------------------------------------------- legacy keys (accepted, ignored)
# Official keys that nothing here reads, with the reason. Files and --opts that set them load as before; a value
# other than the default gets one log line per key per load (legacy_key_notes).
LEGACY_KEYS = {
    'ENABLE_AMP': 'deprecated in the official code too; AMP_ENABLE turns mixed precision on and off',
    'FUSED_WINDOW_PROCESS': "the official fused window CUDA kernel; the models' own window ops run",
    'LOCAL_RANK': 'the local rank comes from the LOCAL_RANK environment variable (torchrun) or --local_rank',
}


def legacy_key_notes(config: CN) -> List[str]:
    """One warning for each key of ``LEGACY_KEYS`` that ``config`` sets to another value than the default."""
    return [f"config key {key} = {_get(config, key)!r} is accepted and ignored: {reason}"
            for key, reason in LEGACY_KEYS.items() if _get(config, key) != _get(_C, key)]


# Choices checked by validate_config: key -> allowed values.
CHOICES = {
    'DATA.DATASET': ('imagenet', 'imagenet22K', 'folder', 'wds', 'hf'),
    'DATA.INTERPOLATION': ('random', 'bilinear', 'bicubic', 'nearest'),
    'DATA.CACHE_MODE': ('no', 'part', 'full'),
    'DATA.LOADER': ('auto', 'torch', 'fast', 'gpu'),
    'MODEL.FAST_PATHS_SELECT': ('measure', 'all', 'none'),
    'DATA.LABELS': ('source', 'csv'),
    'TRAIN.LOSS': ('ce', 'bce'),
    'MODEL.TYPE': ('swin', 'swinv2', 'swin_mlp', 'swin_moe'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step', 'multistep'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd', 'fused_adam', 'fused_lamb'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
    'AUG.REMODE': ('pixel', 'rand', 'const'),
    'AMP_OPT_LEVEL': ('', 'O0', 'O1', 'O2'),
    'AMP_DTYPE': ('auto', 'float16', 'bfloat16'),
    'DEVICE': ('auto', 'cpu', 'cuda'),
    'LOGGER.WANDB.MODE': ('', 'online', 'offline', 'disabled'),
}


def get_defaults() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


def _all_keys(node: CN, prefix: str = '') -> list[str]:
    keys = []
    for k, v in node.items():
        full = prefix + k
        keys.extend(_all_keys(v, full + '.') if isinstance(v, CN) else [full])
    return keys


def _unknown_key_error(exc: KeyError, where: str) -> ConfigError:
    msg = str(exc.args[0]) if exc.args else str(exc)
    key = msg.split(':')[-1].strip()
    close = difflib.get_close_matches(key, _all_keys(_C), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ''
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _type_error(exc: ValueError, where: str) -> ConfigError:
    """yacs' type-mismatch error, reworded; a section given a plain value is named as such."""
    msg = str(exc)
    key = msg.rsplit('config key:', 1)[-1].strip() if 'config key:' in msg else ''
    if key and 'CfgNode' in msg.split(' with values ')[0]:
        return ConfigError(f"in {where}: {key} is a section of keys, not a single value")
    if key:
        default = _get(_C, key)
        shown = msg.split(' with values (', 1)[-1].rsplit(') for config key', 1)[0]
        got = shown.split(' vs. ', 1)[-1] if ' vs. ' in shown else '?'
        got = got if got.isprintable() else repr(got)  # a newline in the value must not break the one-line message
        hint = (f" (a list: [patch_embed, layers.0] in YAML, one quoted argument \"['patch_embed', 'layers.0']\" "
                f"in --opts)"
                if key in STRING_LISTS else '')
        return ConfigError(f"in {where}: {key} must be of type {type(default).__name__} like its default "
                           f"{default!r}, got {got}{hint}")
    return ConfigError(f"in {where}: {msg}")


def _merge_file(config: CN, cfg_file: str, _seen: Optional[set] = None) -> None:
    """Merge a YAML file into config, its ``BASE`` files first (paths relative to the file)."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    seen = set() if _seen is None else _seen
    real = os.path.realpath(cfg_file)
    if real in seen:
        raise ConfigError(f"config file {cfg_file} includes itself through BASE")
    seen.add(real)
    with open(cfg_file) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {cfg_file} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {cfg_file} must hold a mapping of keys, not {type(data).__name__}")
    for base in data.get('BASE', ['']) or ['']:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), seen)
    _take_int_or_pair_keys(config, data)
    try:
        config.merge_from_other_cfg(config.load_cfg(yaml.safe_dump(data)))
    except KeyError as e:
        raise _unknown_key_error(e, cfg_file) from None
    except ValueError as e:
        raise _type_error(e, cfg_file) from None


def merge_opts(config: CN, opts: Sequence[str]) -> None:
    """``--opts`` KEY VALUE pairs into ``config`` (as ``load_config`` merges them); a ConfigError names a bad one."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
    for key, value in zip(opts[::2], opts[1::2]):
        if key in INT_OR_PAIR:
            _take_int_or_pair(config, key, CN._decode_cfg_value(value))
    try:
        config.merge_from_list(opts)
    except KeyError as e:
        raise _unknown_key_error(e, '--opts') from None
    except ValueError as e:
        raise _type_error(e, '--opts') from None
    except AssertionError as e:  # yacs asserts on a non-existent key in merge_from_list
        if 'Non-existent key' in str(e):
            raise _unknown_key_error(KeyError(str(e)), '--opts') from None
        raise ConfigError(f"in --opts: {e}") from None


# Keys that take an int or an [a, b] pair (their default is the int). yacs refuses a value whose type differs from
# the current one, so a merge first sets the key to the incoming value's type (_take_int_or_pair); _check_types and
# validate_config then check what it holds.
INT_OR_PAIR = ('DATA.IMG_SIZE',)


def _take_int_or_pair(config: CN, key: str, value: Any) -> None:
    section, name = key.split('.')
    if isinstance(value, (list, tuple)) or isinstance(_get(config, key), (list, tuple)):
        config[section][name] = list(value) if isinstance(value, (list, tuple)) else value


def _take_int_or_pair_keys(config: CN, data: dict) -> None:
    """``_take_int_or_pair`` for each ``INT_OR_PAIR`` key that plain config data (a file, a stored config) sets."""
    for key in INT_OR_PAIR:
        section, name = key.split('.')
        if isinstance(data.get(section), dict) and name in data[section]:
            _take_int_or_pair(config, key, data[section][name])


def merge_config_dict(config: CN, data: dict) -> None:
    """Merge plain config data (a checkpoint's stored config, ``config_to_dict``) into ``config``, taking the
    ``INT_OR_PAIR`` keys ([height, width] sizes) as the files and ``--opts`` do; yacs' errors pass through."""
    _take_int_or_pair_keys(config, data)
    config.merge_from_other_cfg(CN(data))


def img_size_hw(config: CN) -> Tuple[int, int]:
    """``DATA.IMG_SIZE`` as (height, width): an int is a square, a pair is [height, width]."""
    size = config.DATA.IMG_SIZE
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


# MODEL.TYPE -> its architecture section under MODEL (the official layout)
MODEL_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}


def model_in_chans(config: CN) -> int:
    """The image channels the model takes: ``MODEL.<section>.IN_CHANS`` of ``MODEL.TYPE`` (``MODEL_SECTIONS``)."""
    return int(config.MODEL[MODEL_SECTIONS.get(config.MODEL.TYPE, 'SWIN')].IN_CHANS)


def in_chans_key(config: CN) -> str:
    return f"MODEL.{MODEL_SECTIONS.get(config.MODEL.TYPE, 'SWIN')}.IN_CHANS"


# ImageNet's RGB statistics (timm.data.constants; copied so that this module imports no torch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The default for channels that are not colour: the middle of the 0..1 range, as timm's (0.5, 0.5, 0.5) presets.
EXTRA_CHANNEL_MEAN, EXTRA_CHANNEL_STD = 0.5, 0.5


def default_mean_std(channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation when ``DATA.MEAN`` / ``DATA.STD`` are empty: 3 channels ImageNet's; 1 channel (grey) the
    average of ImageNet's three (0.449 / 0.226: what a grey image made of an RGB one has); 2 channels (grey +
    alpha) that and 0.5 / 0.5; more than 3 (RGBA, multispectral) ImageNet's RGB for the first three and 0.5 / 0.5
    for each further channel."""
    if channels >= 3:
        extra = channels - 3
        return (IMAGENET_MEAN + (EXTRA_CHANNEL_MEAN,) * extra, IMAGENET_STD + (EXTRA_CHANNEL_STD,) * extra)
    grey_mean, grey_std = round(sum(IMAGENET_MEAN) / 3, 3), round(sum(IMAGENET_STD) / 3, 3)
    extra = channels - 1
    return ((grey_mean,) + (EXTRA_CHANNEL_MEAN,) * extra, (grey_std,) + (EXTRA_CHANNEL_STD,) * extra)


def mean_std(config: CN) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) per channel of the normalisation: ``DATA.MEAN`` / ``DATA.STD``, each defaulting to
    ``default_mean_std`` of the model's channel count when empty."""
    mean, std = default_mean_std(model_in_chans(config))
    return (tuple(float(v) for v in config.DATA.MEAN) or mean, tuple(float(v) for v in config.DATA.STD) or std)


def _get(config: CN, dotted: str) -> Any:
    node = config
    for part in dotted.split('.'):
        node = node[part]
    return node


# Keys whose value may be None although their default is not.
NULLABLE = ('TRAIN.CLIP_GRAD',)
# List keys with an empty default whose elements are strings (an empty default says nothing about its elements).
STRING_LISTS = ('TRAIN.FREEZE',)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(config: CN) -> None:
    """Types yacs does not enforce: None in place of a value, list elements, NaN, the None-default keys."""
    for key in _all_keys(_C):
        default, value = _get(_C, key), _get(config, key)
        if default is None:
            continue
        if key in INT_OR_PAIR:
            _check_int_or_pair(key, value)
            continue
        if value is None:
            if key in NULLABLE:
                continue
            raise ConfigError(f"{key} must be of type {type(default).__name__} like its default {default!r}, got None "
                              f"(an empty YAML value is None)")
        # yacs checks a value against the current one, so a None set first lets any type in after it
        same_kind = (isinstance(value, (list, tuple)) if isinstance(default, (list, tuple))
                     else type(value) is type(default))
        if not same_kind:
            raise ConfigError(f"{key} must be of type {type(default).__name__} like its default {default!r}, "
                              f"got {value!r}")
        if isinstance(value, float) and value != value:
            raise ConfigError(f"{key} is NaN")
        if isinstance(default, (list, tuple)):
            elem = str if key in STRING_LISTS else type(default[0]) if default else None
            for v in value:
                ok = (_is_number(v) if elem in (float, None) and key != 'BASE' else
                      isinstance(v, elem) and not (elem is int and isinstance(v, bool)))
                if not ok:
                    want = 'numbers' if elem in (float, None) else f'{elem.__name__} values'
                    raise ConfigError(f"{key} must hold {want}, got {list(value)!r}")
    if len(config.TRAIN.OPTIMIZER.BETAS) != 2:
        raise ConfigError(f"TRAIN.OPTIMIZER.BETAS needs 2 numbers, got {list(config.TRAIN.OPTIMIZER.BETAS)}")
    for key in ('MODEL.SWIN.QK_SCALE', 'MODEL.SWIN_MOE.QK_SCALE'):
        value = _get(config, key)
        if value is not None and not (_is_number(value) and value > 0):
            raise ConfigError(f"{key} must be None (head_dim ** -0.5) or a positive number, got {value!r}")
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not (isinstance(minmax, (list, tuple)) and len(minmax) == 2
                                   and all(_is_number(v) for v in minmax)):
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be None or [min, max] ratios, got {minmax!r}")


def _check_int_or_pair(key: str, value: Any) -> None:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:  # the message of the other sizes
        raise ConfigError(f"{key} must be >= 1, got {value!r}")
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(positive_int(v) for v in value)
    if not (positive_int(value) or pair):
        raise ConfigError(f"{key} must be a positive int or [height, width] (two positive ints), got {value!r}")


def _check_channels(config: CN, pretrain: bool) -> None:
    """Channel counts and sizes the loaders cannot give: named with the keys that ask for them."""
    chans, chans_key = model_in_chans(config), in_chans_key(config)
    for key in ('DATA.MEAN', 'DATA.STD'):
        values = list(_get(config, key))
        if values and len(values) != chans:
            raise ConfigError(f"{key} has {len(values)} values but {chans_key} is {chans}: give one per channel "
                              f"(or [] for the default, see README 'Channels')")
    if any(v <= 0 for v in config.DATA.STD):
        raise ConfigError(f"DATA.STD must hold positive numbers, got {list(config.DATA.STD)}")
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if chans != 3 and config.DATA.DATASET == 'wds':
        raise ConfigError(f"DATA.DATASET 'wds' reads RGB images only; {chans_key} is {chans}: use DATA.DATASET "
                          f"folder, imagenet or hf for other channel counts")
    colour_ops = [key for key, on in (('AUG.AUTO_AUGMENT', config.AUG.AUTO_AUGMENT not in ('', 'none')),
                                      ('AUG.COLOR_JITTER', config.AUG.COLOR_JITTER > 0)) if on]
    if training and not pretrain and colour_ops:
        # timm's RandAugment and ColorJitter are Pillow ops on RGB; most also run on grey ('L') images, none on
        # RGBA or N channels, and the gpu loader's device versions are RGB only
        if chans not in (1, 3):
            raise ConfigError(f"{' and '.join(colour_ops)} (colour augmentation) need 1 or 3 channels; {chans_key} "
                              f"is {chans}: set AUG.AUTO_AUGMENT none and AUG.COLOR_JITTER 0.0 (the crop, flip and "
                              f"erasing still run)")
        if chans == 1 and config.DATA.LOADER == 'gpu':
            raise ConfigError(f"DATA.LOADER 'gpu' runs RandAugment/ColorJitter on RGB only; {chans_key} is 1: use "
                              f"DATA.LOADER torch or fast, or set AUG.AUTO_AUGMENT none and AUG.COLOR_JITTER 0.0 "
                              f"(the crop, flip and erasing still run)")
    h, w = img_size_hw(config)
    if pretrain and h != w:
        raise ConfigError(f"DATA.IMG_SIZE {list(config.DATA.IMG_SIZE)}: SimMIM pre-training (its mask generator) "
                          f"takes square images; give one int")


def validate_config(config: CN, pretrain: bool = False, device: Optional[str] = None) -> None:
    """Check values the model, loop and data would otherwise trip over deep inside; raise ConfigError.

    ``pretrain``: the config is for SimMIM pre-training, which has no Mixup/CutMix (its loader ignores the
    ``AUG.MIXUP*`` keys, which the official pre-training configs leave at their defaults), so the even-batch
    check for Mixup does not apply. ``device`` (``'cpu'``/``'cuda'``): where the run is, known once the
    process group is set up (``engine.run`` passes it); the checks that need it are skipped when it is None."""
    _check_types(config)
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {list(allowed)}")
    positive = ['DATA.BATCH_SIZE', 'MODEL.NUM_CLASSES', 'TRAIN.EPOCHS',
                'TRAIN.ACCUMULATION_STEPS', 'SAVE_FREQ', 'PRINT_FREQ', 'TRAIN.MAX_NONFINITE_STEPS']
    for key in positive:
        if _get(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {_get(config, key)!r}")
    for key in ('DATA.NUM_WORKERS', 'TRAIN.WARMUP_EPOCHS', 'TRAIN.START_EPOCH', 'TRAIN.WEIGHT_DECAY',
                'TRAIN.BASE_LR', 'TRAIN.WARMUP_LR', 'TRAIN.MIN_LR', 'TRAIN.SAVE_EVERY_STEPS',
                'TRAIN.KEEP_CHECKPOINTS', 'AUG.MIXUP', 'AUG.CUTMIX', 'AUG.REPROB', 'DATA.REPEATED_AUG',
                'DATA.WDS_SHUFFLE'):
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)!r}")
    _check_data_source(config)
    _check_labels(config, pretrain)
    _check_freeze(config, pretrain)
    scale = list(config.AUG.RRC_SCALE)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"AUG.RRC_SCALE must be [min, max] with 0 < min <= max <= 1, got {scale}")
    for key in ('MODEL.DROP_RATE', 'MODEL.DROP_PATH_RATE', 'MODEL.LABEL_SMOOTHING', 'AUG.REPROB', 'AUG.HFLIP',
                'AUG.MIXUP_PROB', 'AUG.MIXUP_SWITCH_PROB'):
        if not 0.0 <= _get(config, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {_get(config, key)!r}")
    if config.TRAIN.WARMUP_EPOCHS > config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) exceeds TRAIN.EPOCHS "
                          f"({config.TRAIN.EPOCHS}); set TRAIN.WARMUP_EPOCHS below TRAIN.EPOCHS")
    if not 0.0 < config.TRAIN.LAYER_DECAY <= 1.0:
        raise ConfigError(f"TRAIN.LAYER_DECAY must be in (0, 1], got {config.TRAIN.LAYER_DECAY!r}")
    if config.TRAIN.EMA.ENABLE and not 0.0 < config.TRAIN.EMA.DECAY < 1.0:
        raise ConfigError(f"TRAIN.EMA.DECAY must be in (0, 1), got {config.TRAIN.EMA.DECAY!r}")
    if config.TRAIN.FSDP.ENABLE and config.AMP_ENABLE and config.AMP_OPT_LEVEL in ('O1', 'O2'):
        raise ConfigError(f"TRAIN.FSDP.ENABLE (--fsdp) does not work with apex AMP_OPT_LEVEL "
                          f"{config.AMP_OPT_LEVEL} (--amp-opt-level); drop --amp-opt-level (FSDP's mixed precision "
                          f"follows AMP_DTYPE)")
    mixup_on = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training and mixup_on and not pretrain and config.DATA.BATCH_SIZE % 2:  # timm's Mixup pairs images in every mode
        raise ConfigError(f"DATA.BATCH_SIZE = {config.DATA.BATCH_SIZE} must be even for Mixup/CutMix "
                          f"with AUG.MIXUP_MODE = {config.AUG.MIXUP_MODE!r}")
    if config.TRAIN.LR_SCHEDULER.NAME == 'step' and config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS < 1:
        raise ConfigError("TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be >= 1 for the step scheduler")
    if config.MODEL.TYPE in MODEL_SECTIONS:
        m = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]]
        prefix = f'MODEL.{MODEL_SECTIONS[config.MODEL.TYPE]}'
        if len(m.DEPTHS) != len(m.NUM_HEADS):
            raise ConfigError(f"{prefix}.DEPTHS {list(m.DEPTHS)} and {prefix}.NUM_HEADS {list(m.NUM_HEADS)} "
                              f"must have the same length")
        for key in ('PATCH_SIZE', 'IN_CHANS', 'EMBED_DIM', 'WINDOW_SIZE'):
            if m[key] < 1:
                raise ConfigError(f"{prefix}.{key} must be >= 1, got {m[key]!r}")
        if any(d < 1 for d in m.DEPTHS) or any(h < 1 for h in m.NUM_HEADS):
            raise ConfigError(f"{prefix}.DEPTHS and NUM_HEADS must be >= 1, got {list(m.DEPTHS)}, "
                              f"{list(m.NUM_HEADS)}")
        for i, heads in enumerate(m.NUM_HEADS):
            dim = m.EMBED_DIM * 2 ** i
            if dim % heads:
                raise ConfigError(f"{prefix}.EMBED_DIM {m.EMBED_DIM}: stage {i} width {dim} is not divisible "
                                  f"by its {heads} heads ({prefix}.NUM_HEADS)")
        if config.MODEL.TYPE in ('swinv2', 'swin_moe') and len(m.PRETRAINED_WINDOW_SIZES) != len(m.DEPTHS):
            raise ConfigError(f"{prefix}.PRETRAINED_WINDOW_SIZES needs {len(m.DEPTHS)} entries, got "
                              f"{list(m.PRETRAINED_WINDOW_SIZES)}")
        if config.MODEL.TYPE == 'swin_moe':
            _check_moe(config)
    if config.MODEL.TYPE in MODEL_SECTIONS and model_in_chans(config) >= 1:
        _check_channels(config, pretrain)
    _check_trackers(config)
    if device is not None and config.TRAIN.FSDP.ENABLE and config.TRAIN.FSDP.CPU_OFFLOAD and device != 'cuda':
        raise ConfigError("TRAIN.FSDP.CPU_OFFLOAD moves the shards from GPU to host memory; this run is on the CPU "
                          "already (DEVICE / --device), so set TRAIN.FSDP.CPU_OFFLOAD False")


def _check_moe(config: CN) -> None:
    """The MODEL.SWIN_MOE keys that the model could only refuse later, or that would fail mid-run."""
    m = config.MODEL.SWIN_MOE
    if len(m.MOE_BLOCKS) != len(m.DEPTHS) or not all(isinstance(b, (list, tuple)) for b in m.MOE_BLOCKS):
        raise ConfigError(f"MODEL.SWIN_MOE.MOE_BLOCKS needs one list of block indices per stage "
                          f"({len(m.DEPTHS)}), got {m.MOE_BLOCKS!r}")
    if m.NUM_LOCAL_EXPERTS == 0:
        raise ConfigError("MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS must not be 0 (> 0: experts per process; < 0: that "
                          "many processes share one expert)")
    if m.TOP_VALUE < 1:
        raise ConfigError(f"MODEL.SWIN_MOE.TOP_VALUE (the k of top-k routing) must be >= 1, got {m.TOP_VALUE}")
    if m.COSINE_ROUTER and (m.COSINE_ROUTER_DIM < 1 or m.COSINE_ROUTER_INIT_T <= 0):
        raise ConfigError(f"MODEL.SWIN_MOE.COSINE_ROUTER_DIM must be >= 1 and COSINE_ROUTER_INIT_T > 0, got "
                          f"{m.COSINE_ROUTER_DIM} and {m.COSINE_ROUTER_INIT_T}")
    if not m.IS_GSHARD_LOSS and m.GATE_NOISE <= 0:
        raise ConfigError("MODEL.SWIN_MOE.GATE_NOISE must be > 0 with IS_GSHARD_LOSS False (the load loss "
                          "normalises by it)")
    if config.TRAIN.FSDP.ENABLE:
        raise ConfigError("TRAIN.FSDP.ENABLE is not supported with MODEL.TYPE swin_moe: its experts are already "
                          "sharded over the processes (DDP with per-rank checkpoints)")
    if not 0 <= m.MOE_DROP < 1:
        raise ConfigError(f"MODEL.SWIN_MOE.MOE_DROP must be in [0, 1), got {m.MOE_DROP}")
def _check_trackers(config: CN) -> None:
    """A ``LOGGER`` value wandb would refuse only after the output folder exists (the trackers' packages are
    checked at start-up by ``utils.trackers.check_tracker_packages``)."""
    wandb = config.LOGGER.WANDB
    bad = [c for c in '/\\#?%:' if c in wandb.PROJECT]
    if wandb.ENABLE and bad:  # wandb's rule for project names
        raise ConfigError(f"LOGGER.WANDB.PROJECT {wandb.PROJECT!r} may not contain {' '.join(bad)} (wandb project "
                          f"names exclude / \\ # ? % :)")


def is_multi_label(config: CN) -> bool:
    """Several labels per image (``DATA.LABELS csv``): multi-hot targets, BCE, mAP / F1 validation."""
    return config.DATA.LABELS == 'csv'


def _check_labels(config: CN, pretrain: bool) -> None:
    """The combinations multi-label data (``DATA.LABELS csv``) and ``TRAIN.LOSS`` cannot honour."""
    if not 0.0 < config.TEST.THRESHOLD < 1.0:
        raise ConfigError(f"TEST.THRESHOLD must be in (0, 1) (a sigmoid probability), got {config.TEST.THRESHOLD!r}")
    if not is_multi_label(config):
        return
    if pretrain:
        raise ConfigError("DATA.LABELS csv (multi-label) is for classification; SimMIM pre-training uses no labels "
                          "and reads class folders or a zip: set DATA.LABELS source")
    if config.TRAIN.LOSS != 'bce':
        raise ConfigError(f"DATA.LABELS csv (multi-label) needs an independent sigmoid per class: set TRAIN.LOSS bce "
                          f"(TRAIN.LOSS {config.TRAIN.LOSS!r} is a softmax over the classes)")
    if config.DATA.DATASET not in ('imagenet', 'folder'):
        raise ConfigError(f"DATA.LABELS csv reads image files under DATA.DATA_PATH named in <split>.csv; DATA.DATASET "
                          f"{config.DATA.DATASET!r} has labels of its own: use DATA.DATASET folder")
    if config.DATA.ZIP_MODE:
        raise ConfigError("DATA.LABELS csv reads image files under DATA.DATA_PATH; DATA.ZIP_MODE (--zip) reads "
                          "<split>.zip with a single-label map file: turn one of them off")


def _check_freeze(config: CN, pretrain: bool) -> None:
    """``TRAIN.FREEZE`` / ``TRAIN.LINEAR_PROBE`` combinations that cannot work (the patterns themselves are
    matched against the model's parameter names when it is built: ``models.freeze_parameters``)."""
    patterns = list(config.TRAIN.FREEZE)
    for pattern in patterns:
        if not pattern.strip() or pattern != pattern.strip():
            raise ConfigError(f"TRAIN.FREEZE holds {pattern!r}: give parameter-name patterns without surrounding "
                              f"spaces, e.g. ['patch_embed', 'layers.0']")
    if config.TRAIN.LINEAR_PROBE and patterns:
        raise ConfigError(f"TRAIN.LINEAR_PROBE freezes everything but the head already; leave TRAIN.FREEZE empty "
                          f"(got {patterns})")
    if config.TRAIN.LINEAR_PROBE and pretrain:
        raise ConfigError("TRAIN.LINEAR_PROBE trains only the classification head; SimMIM pre-training has none: "
                          "set TRAIN.LINEAR_PROBE False")


def _check_data_source(config: CN) -> None:
    """The combinations ``DATA.DATASET`` wds / hf cannot honour (their readers are in data/wds.py, data/hf.py)."""
    kind = config.DATA.DATASET
    if kind not in ('wds', 'hf'):
        return
    if config.DATA.ZIP_MODE:
        raise ConfigError(f"DATA.ZIP_MODE (--zip) reads <split>.zip archives; DATA.DATASET {kind!r} reads "
                          f"{'tar shards' if kind == 'wds' else 'a Hugging Face dataset'}: turn one of them off")
    if kind == 'wds' and config.DATA.REPEATED_AUG > 1:
        raise ConfigError("DATA.REPEATED_AUG needs random access to repeat an image on several ranks; "
                          "DATA.DATASET 'wds' streams its shards: use DATA.DATASET hf or folder, or turn it off")
    if kind == 'hf':
        for key in ('DATA.HF_IMAGE_COLUMN', 'DATA.HF_LABEL_COLUMN'):
            if not _get(config, key):
                raise ConfigError(f"{key} must name a column of the dataset, got {_get(config, key)!r}")
    if not config.DATA.TRAIN_SPLIT or not config.DATA.VAL_SPLIT:
        raise ConfigError(f"DATA.TRAIN_SPLIT and DATA.VAL_SPLIT must be set for DATA.DATASET {kind!r}")


def clip_warmup(config: CN) -> Optional[str]:
    """Shorten a warmup that does not end before the run does (config not frozen); returns a warning, or None.

    With ``TRAIN.WARMUP_EPOCHS >= TRAIN.EPOCHS`` the rate never reaches ``BASE_LR`` and the cosine and linear
    schedules are left no decay updates (length 0). The warmup becomes ``EPOCHS - 1`` epochs, so the last epoch
    decays. The warning is returned only for a training run (evaluation and throughput use no schedule).
    """
    warmup, epochs = config.TRAIN.WARMUP_EPOCHS, config.TRAIN.EPOCHS
    if not (_is_number(warmup) and _is_number(epochs)) or epochs < 1 or warmup < epochs:
        return None  # validate_config reports wrong types and values
    clipped = int(epochs) - 1
    config.TRAIN.WARMUP_EPOCHS = clipped
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None
    fix = "no warmup: --opts TRAIN.WARMUP_EPOCHS 0" if clipped == 0 else \
        f"a warmup of at most {clipped} epoch(s), e.g. --opts TRAIN.WARMUP_EPOCHS {clipped}"
    return (f"TRAIN.WARMUP_EPOCHS ({warmup}) is not shorter than TRAIN.EPOCHS ({epochs}): the warmup is clipped "
            f"to {clipped} epoch(s) so that the last epoch decays from TRAIN.BASE_LR; to train without this "
            f"warning, ask for {fix}")


def load_config(cfg_file: Optional[str] = None, opts: Iterable[str] = ()) -> CN:
    """Defaults, then ``cfg_file`` (with its BASE files), then ``opts`` KEY VALUE pairs; validated, frozen.

    Unlike ``get_config`` this leaves ``OUTPUT`` as given (no ``<MODEL.NAME>/<TAG>`` suffix).
    """
    config = get_defaults()
    if cfg_file:
        _merge_file(config, cfg_file)
    merge_opts(config, opts or ())
    for note in legacy_key_notes(config):
        _LOG.warning(note)
    validate_config(config)
    config.freeze()
    return config


def get_config(args: Any, notes: Optional[List[str]] = None, pretrain: bool = False) -> CN:
    """Build the config from parsed command-line ``args`` (the official flags), as the official code does.

    Flags win over ``--opts``, which win over the file. ``OUTPUT`` becomes ``<output>/<MODEL.NAME>/<TAG>``.
    A warmup as long as the run is clipped (``clip_warmup``); its warning is appended to ``notes`` when given
    (``main`` logs it once the log exists, on rank 0 only), else logged here. ``load_config``, the library
    entry, keeps such a warmup an error. The warnings of ``legacy_key_notes`` (for the file and ``--opts``) go the
    same way. Imports no torch, so that a bad config is reported at once.
    ``pretrain``: SimMIM pre-training (``main.main(..., pretrain=True)``), see ``validate_config``.
    """
    config = get_defaults()
    if getattr(args, 'cfg', None):
        _merge_file(config, args.cfg)
    merge_opts(config, getattr(args, 'opts', None) or ())
    # what the file and --opts set (main.py's --help says which official flags are accepted only)
    legacy = legacy_key_notes(config)

    def flag(name: str) -> Any:
        return getattr(args, name, None)

    if flag('batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if flag('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if flag('zip'):
        config.DATA.ZIP_MODE = True
    if flag('cache_mode'):
        config.DATA.CACHE_MODE = args.cache_mode
    if flag('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if flag('resume'):
        config.MODEL.RESUME = args.resume
    if flag('accumulation_steps'):
        config.TRAIN.ACCUMULATION_STEPS = args.accumulation_steps
    if flag('use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if flag('amp_opt_level'):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        if args.amp_opt_level == 'O0':
            config.AMP_ENABLE = False
    if flag('disable_amp'):
        config.AMP_ENABLE = False
    if flag('output'):
        config.OUTPUT = args.output
    if flag('tag'):
        config.TAG = args.tag
    if flag('eval'):
        config.EVAL_MODE = True
    if flag('throughput'):
        config.THROUGHPUT_MODE = True
    if flag('fused_window_process'):
        config.FUSED_WINDOW_PROCESS = True
    if flag('fused_layernorm'):
        config.FUSED_LAYERNORM = True
    if flag('optim'):
        config.TRAIN.OPTIMIZER.NAME = args.optim
    if flag('device'):
        config.DEVICE = args.device
    if flag('trust_checkpoint'):
        config.TRUST_CHECKPOINTS = True
    if flag('fsdp'):
        config.TRAIN.FSDP.ENABLE = True
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', flag('local_rank') or 0))
    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    note = clip_warmup(config)
    validate_config(config, pretrain=pretrain)
    if note and notes is not None:
        notes.append(note)
    elif note:
        _LOG.warning(note)
    for line in legacy:  # as the warmup note: to main's log when it collects notes, else logged here
        if notes is not None:
            notes.append(line)
        else:
            _LOG.warning(line)
    config.freeze()
    return config


def apply_linear_scaling(config: CN, world_size: int) -> CN:
    """The linear scaling rule, applied once: lr * batch_per_process * world_size * accumulation / 512.

    Applies to BASE_LR, WARMUP_LR and MIN_LR. Returns a new frozen config.
    """
    factor = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    config = config.clone()
    config.defrost()
    config.TRAIN.BASE_LR = config.TRAIN.BASE_LR * factor
    config.TRAIN.WARMUP_LR = config.TRAIN.WARMUP_LR * factor
    config.TRAIN.MIN_LR = config.TRAIN.MIN_LR * factor
    config.freeze()
    return config


def config_to_dict(config: CN) -> dict:
    """The config as plain Python data (dicts, lists, numbers, strings): safe to store in a checkpoint."""
    def convert(v: Any) -> Any:
        if isinstance(v, CN):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v
    return convert(config)


def save_config(config: CN, path: str) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(config.dump())
    os.replace(tmp, path)
