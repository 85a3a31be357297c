"""Helpers shared by the entry point and the engine.

- ``utils.checkpoint``: the one module that reads and writes checkpoint files (save, resume, export).
- ``utils.distributed``: process-group set-up from the ``torchrun`` environment, small collectives and the one
  unwrap helper (``unwrap_model``: under compile, DDP and EMA wrappers).
- ``utils.fsdp``: FSDP2 sharding of the model and DCP reading/writing of sharded state (``utils.checkpoint``
  decides the file layout).
- ``utils.logger``: per-rank log files, TensorBoard and the ``metrics.jsonl`` writer.
- ``utils.misc``: seeding, memory and time formatting.
- ``utils.trackers``: the experiment trackers (TensorBoard, wandb, MLflow) behind one ``Trackers`` object on
  rank 0; their run ids travel in the checkpoint.

Nothing is imported here so that ``import utils.checkpoint`` stays cheap (models/ uses it to read files).
"""
