"""Experiment trackers behind one small interface on rank 0: TensorBoard, Weights & Biases, MLflow.

The engine sees one ``Trackers`` object: ``log(scalars, step)`` with names such as ``train/loss`` (step: the
optimizer update since the start of training) or ``val/acc1`` (step: the epoch), ``flush()`` and
``close(status)``. Every enabled backend gets the same scalars; wandb and MLflow also get the resolved config
(wandb: ``run.config``; MLflow: one param per dotted key). Other ranks get a ``Trackers`` with no backends.

Resuming: ``run_ids()`` (``{'wandb': id, 'mlflow': run_id}``) goes into ``TrainState.tracker_runs``, which
``utils.checkpoint`` saves with every checkpoint and restores; ``start_trackers`` given those ids continues the
same wandb run (``wandb.init(id=..., resume='allow')``) and the same MLflow run (its status set back to
RUNNING), so a run stopped and resumed shows as one run in the tracker.

wandb and MLflow are optional: ``check_tracker_packages`` (called by ``main.py`` before the output folder is
written) turns an enabled tracker whose package is missing into a one-line error with the pip command. This
module imports neither package, nor torch, at import time.

Why by hand: neither wandb, MLflow nor TensorBoard offers a common front-end, and the project-level libraries
that do (Lightning's loggers, HF Accelerate's trackers) come with their trainer; these adapters are a few
lines over each library's own client.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import random
import time
from typing import Any, Dict, List, Mapping, Optional, Protocol

from config import ConfigError, config_to_dict

# config key -> (module to import, pip command). mlflow-skinny provides the same ``mlflow`` module, the client
# without the server and UI.
PACKAGES = {
    'LOGGER.WANDB.ENABLE': ('wandb', 'pip install wandb'),
    'LOGGER.MLFLOW.ENABLE': ('mlflow', 'pip install mlflow  (or mlflow-skinny: the client only)'),
}
# The scalars' x-axis: train/* are logged per optimizer update, val/* per epoch (as TensorBoard shows them).
UPDATE_AXIS, EPOCH_AXIS = 'update', 'epoch'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked) or has no spec
        return False


def check_tracker_packages(config: Any) -> None:
    """Raise a one-line ``ConfigError`` naming the key and the pip command when an enabled tracker's package is
    not installed (training runs only: ``--eval`` and ``--throughput`` log to no tracker). Imports nothing."""
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return
    for key, (module, pip) in PACKAGES.items():
        node = config
        for part in key.split('.'):
            node = node[part]
        if node and not _installed(module):
            raise ConfigError(f"{key} is True but the {module} package is not installed; install it "
                              f"({pip}) or set {key} False")


def flat_params(config: Any) -> Dict[str, str]:
    """The resolved config as MLflow params: one ``SECTION.KEY`` -> ``str(value)`` per leaf."""
    flat: Dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = str(value)
    walk(config_to_dict(config), '')
    return flat


def default_run_name(config: Any) -> str:
    return f"{config.MODEL.NAME}/{config.TAG}"


class Backend(Protocol):
    """One tracker. ``run_id``: what a resumed run needs to continue the same tracker run (None: nothing)."""
    name: str
    run_id: Optional[str]

    def log(self, scalars: Mapping[str, float], step: int, axis: str) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardBackend:
    """``torch.utils.tensorboard.SummaryWriter`` event files in the output folder (``TENSORBOARD``)."""
    name, run_id = 'tensorboard', None

    def __init__(self, writer: Any):
        self.writer = writer

    def log(self, scalars: Mapping[str, float], step: int, axis: str) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbBackend:
    """A wandb run (``LOGGER.WANDB``), its files under ``<OUTPUT>/wandb``. The scalars are logged with their own
    x-axis (``update`` for train/*, ``epoch`` for val/*: ``define_metric``) rather than wandb's step, which
    must only grow: after a mid-epoch resume the updates since the checkpoint are logged again."""
    name = 'wandb'

    def __init__(self, config: Any, resume_id: Optional[str], log: logging.Logger):
        import wandb
        c = config.LOGGER.WANDB
        kwargs: Dict[str, Any] = {'dir': config.OUTPUT, 'name': c.NAME or default_run_name(config),
                                  'project': c.PROJECT or None, 'entity': c.ENTITY or None}
        if c.MODE:
            kwargs['mode'] = c.MODE
        if resume_id:
            kwargs.update(id=resume_id, resume='allow')
        self.run = wandb.init(**kwargs)
        # allow_val_change: a resumed run may change keys (e.g. a raised TRAIN.EPOCHS); the newest values show.
        self.run.config.update(config_to_dict(config), allow_val_change=True)
        for axis in (UPDATE_AXIS, EPOCH_AXIS):
            self.run.define_metric(axis, hidden=True)
        self.run.define_metric('train/*', step_metric=UPDATE_AXIS)
        self.run.define_metric('val/*', step_metric=EPOCH_AXIS)
        self.run_id = self.run.id
        log.info(f"wandb: {'resumed' if resume_id else 'started'} run {self.run_id} (mode "
                 f"{getattr(self.run.settings, 'mode', '?')}) under {config.OUTPUT}/wandb")

    def log(self, scalars: Mapping[str, float], step: int, axis: str) -> None:
        self.run.log({**scalars, axis: step})

    def flush(self) -> None:
        pass  # wandb's service process writes as it receives

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == 'FINISHED' else 1)


class MlflowBackend:
    """An MLflow run (``LOGGER.MLFLOW``) through ``MlflowClient``: no process-global active run, so one process
    may start several runs (tests) and nothing else in it can end ours. Params are immutable in MLflow, so a
    resumed run adds the keys its run lacks and logs a warning for the values that changed."""
    name = 'mlflow'

    def __init__(self, config: Any, resume_id: Optional[str], log: logging.Logger):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        c = config.LOGGER.MLFLOW
        try:  # the client opens its store here: an unusable URI fails now, with MLflow's reason
            self.client = MlflowClient(tracking_uri=c.TRACKING_URI or None)
        except Exception as e:  # MlflowException, or ImportError for a store needing the full mlflow package
            uri = c.TRACKING_URI or os.environ.get('MLFLOW_TRACKING_URI', '') or "MLflow's default"
            reason = ' '.join(str(e).split())[:300]
            raise ConfigError(f"LOGGER.MLFLOW.TRACKING_URI {uri!r}: MLflow cannot use it: {type(e).__name__}: "
                              f"{reason}") from None
        params = flat_params(config)
        if resume_id:
            try:
                run = self.client.get_run(resume_id)
            except MlflowException as e:  # e.g. another tracking URI than the checkpoint's run was logged to
                if e.error_code != 'RESOURCE_DOES_NOT_EXIST':
                    raise
                log.warning(f"mlflow: the checkpoint's run {resume_id} is not at {self.client.tracking_uri}; "
                            f"starting a new run there")
                resume_id = None
        if resume_id:
            self.client.update_run(resume_id, status='RUNNING')
            logged = run.data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                log.warning(f"mlflow: run {resume_id} keeps its first value of {len(changed)} changed config keys "
                            f"(MLflow params cannot change): {', '.join(changed[:10])}"
                            + (' ...' if len(changed) > 10 else ''))
            params = {k: v for k, v in params.items() if k not in logged}
            self.run_id = resume_id
        else:
            experiment = self._experiment_id(c.EXPERIMENT)
            run = self.client.create_run(experiment, run_name=c.RUN_NAME or default_run_name(config))
            self.run_id = run.info.run_id
        # Metrics are logged asynchronously where MLflow can (>= 2.8: ``synchronous=False``), so that a slow tracking
        # server does not hold up training on rank 0; ``flush`` (end of epoch) and ``close`` wait for them.
        self.asynchronous = 'synchronous' in inspect.signature(self.client.log_batch).parameters
        self.pending: List[Any] = []  # RunOperations not yet waited for
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        log.info(f"mlflow: {'resumed' if resume_id else 'started'} run {self.run_id} at "
                 f"{self.client.tracking_uri}")

    def _experiment_id(self, name: str) -> str:
        name = name or os.environ.get('MLFLOW_EXPERIMENT_NAME', '') or 'Default'
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self.client.create_experiment(name)

    def log(self, scalars: Mapping[str, float], step: int, axis: str) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        if self.asynchronous:
            self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        else:
            self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        for operations in self.pending:
            if operations is not None:
                operations.wait()
        self.pending = []

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The loggers of a training run (rank 0; elsewhere none): every scalar goes to each of them."""

    def __init__(self, backends: Optional[List[Any]] = None):
        self.backends: List[Any] = list(backends or [])

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log(self, scalars: Mapping[str, float], step: int, axis: str = UPDATE_AXIS) -> None:
        """Log ``scalars`` (name -> number) at ``step`` on the ``axis`` x-axis (``update`` or ``epoch``)."""
        for backend in self.backends:
            backend.log(scalars, step, axis)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def run_ids(self) -> Dict[str, str]:
        """Tracker name -> run id, for the checkpoint (``TrainState.tracker_runs``)."""
        return {b.name: b.run_id for b in self.backends if b.run_id}

    def close(self, status: str = 'FINISHED') -> None:
        """End every tracker run. ``status``: MLflow's FINISHED, KILLED (stopped by a signal, to be resumed) or
        FAILED; wandb gets exit code 0 for FINISHED, else 1."""
        for backend in self.backends:
            backend.close(status)
        self.backends = []


def start_trackers(config: Any, is_main: bool, resume_ids: Optional[Mapping[str, str]] = None,
                   log: Optional[logging.Logger] = None) -> Trackers:
    """The enabled trackers on rank 0 (``TENSORBOARD``, ``LOGGER.WANDB``, ``LOGGER.MLFLOW``), continuing the
    runs named in ``resume_ids`` (from the checkpoint); no backends on other ranks. Raises ``ConfigError`` when
    an enabled tracker's package is missing; a tracker that fails to start ends those started before it."""
    log = log or logging.getLogger(__name__)
    if not is_main:
        return Trackers()
    check_tracker_packages(config)
    resume_ids = dict(resume_ids or {})
    trackers = Trackers()
    # Python's global ``random`` feeds the data augmentations: keep it as it was, so that a run with a tracker on
    # trains exactly as one without. MLflow draws generated run names from it (we always pass a name; wandb 0.31
    # draws nothing), and another version of either may draw more.
    python_rng = random.getstate()
    try:
        if config.TENSORBOARD:
            from .logger import create_tb_writer
            writer = create_tb_writer(config.OUTPUT, True, True)
            if writer is not None:
                trackers.backends.append(TensorBoardBackend(writer))
        if config.LOGGER.WANDB.ENABLE:
            trackers.backends.append(WandbBackend(config, resume_ids.get('wandb'), log))
        if config.LOGGER.MLFLOW.ENABLE:
            trackers.backends.append(MlflowBackend(config, resume_ids.get('mlflow'), log))
    except BaseException:
        trackers.close('FAILED')
        raise
    finally:
        random.setstate(python_rng)
    return trackers
