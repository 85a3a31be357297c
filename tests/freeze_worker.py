"""A ``torchrun`` entry point for tests/test_freeze.py: ``main.main`` with the remaining arguments, then this
rank's final model weights saved to ``<prefix>_rank<RANK>.pt`` (a checkpoint file holds rank 0's only, and the
test compares the ranks). ``python tests/freeze_worker.py <prefix> <main.py arguments...>``."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import engine  # noqa: E402
import main  # noqa: E402
from utils.distributed import unwrap_model  # noqa: E402

built = {}
_build_training = engine.build_training


def _keep(*args, **kwargs):
    built['training'] = _build_training(*args, **kwargs)
    return built['training']


if __name__ == '__main__':
    prefix, argv = sys.argv[1], sys.argv[2:]
    engine.build_training = _keep  # engine.run looks it up at call time
    code = main.main(argv)
    if code == 0 and 'training' in built:
        state = unwrap_model(built['training'].state.model).state_dict()
        torch.save(state, f"{prefix}_rank{os.environ.get('RANK', '0')}.pt")
    sys.exit(code)
