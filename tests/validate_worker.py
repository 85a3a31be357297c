"""Run by tests/test_engine.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): ``engine.validate`` over uneven
shards of the known-logits case (tests/helpers.py), rank 0 taking 8 images in batches of 3, rank 1 five in batches
of 2 (and an empty batch: every image of it dropped as unreadable). Rank 0 writes what validate returned, as
JSON, to the path given as the only argument."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


def main(out_path: str) -> None:
    import engine
    from config import load_config
    from helpers import fixed_logits_model, known_logits_case
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    try:
        rank = dist.get_rank()
        images, targets, logits, _ = known_logits_case()
        shard, batch_size = (slice(0, 8), 3) if rank == 0 else (slice(8, 13), 2)
        batches = list(DataLoader(TensorDataset(images[shard], targets[shard]), batch_size=batch_size))
        if rank == 1:
            batches.insert(1, (images[:0], targets[:0]))
        config = load_config(opts=['MODEL.NUM_CLASSES', '10', 'PRINT_FREQ', '1'])
        result = engine.validate(config, batches, fixed_logits_model(logits), engine.Precision(torch.device('cpu')))
        if rank == 0:
            with open(out_path, 'w') as f:
                json.dump(list(result), f)
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
