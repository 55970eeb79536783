"""MetaOptimize in Lightning: the learned step sizes in the trainer's loggers, and a warning about lr schedulers.

``trainer = lightning.Trainer(callbacks=[StepSizeCallback()], ...)`` with a LightningModule whose
``configure_optimizers`` returns a ``MetaOptimize``. Every ``log_every_n_steps`` optimizer steps the callback logs
``optimizer.step_sizes()`` through ``pl_module.log_dict``, so into every logger of the trainer (CSVLogger's
metrics.csv, TensorBoard, W&B) in the row of that step, under its names: ``step_size`` (``blocks="scalar"``),
``step_size/<block>`` (``param_group``), ``step_size/<param>`` or ``step_size/<param>/{min,median,max}`` (per
tensor); with several MetaOptimize, ``optimizer<i>/...``.

An lr scheduler of ``configure_optimizers`` acts on the param groups' ``lr``, which for MetaOptimize multiplies the
learned step size (default 1.0): one that decays it scales the step size down whatever MetaOptimize learns, and
``LearningRateMonitor`` logs that multiplier, not the step size. The callback warns once, at train start
(``StepSizeScheduleWarning``), when a scheduler on a MetaOptimize will decay it (a ``LambdaLR`` is evaluated at
the last step, other schedulers are replayed on a copy; ``ReduceLROnPlateau`` may decay it, and is warned of too).
"""

from __future__ import annotations

import math
import warnings

from lightning.pytorch import Callback

from metaopt.integrations._common import StepSizeScheduleWarning, step_size_logs, unwrap, warn_if_decaying

__all__ = ["StepSizeCallback", "StepSizeScheduleWarning"]


class StepSizeCallback(Callback):
    """Logs the learned step sizes of the trainer's MetaOptimize optimizers at its logging interval, and warns
    at train start when one of its lr schedulers will scale them down. See the module's docstring."""

    def __init__(self) -> None:
        self._optimizers: list = []
        self._last_logged_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._optimizers = [opt for opt in map(unwrap, trainer.optimizers) if opt is not None]
        if not self._optimizers:
            warnings.warn("metaopt: StepSizeCallback logs nothing: no optimizer of configure_optimizers is "
                          "MetaOptimize", stacklevel=2)
        for config in trainer.lr_scheduler_configs:
            optimizer = unwrap(getattr(config.scheduler, "optimizer", None))
            if optimizer not in self._optimizers:
                continue
            if config.interval == "step":
                steps = trainer.estimated_stepping_batches
            else:
                steps = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
            warn_if_decaying(config.scheduler, steps / config.frequency,
                             f"the lr scheduler {type(config.scheduler).__name__} of configure_optimizers "
                             f"(interval={config.interval!r})", optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far; the loggers write at the same interval
        if not self._optimizers or step == self._last_logged_step or trainer.log_every_n_steps == 0:
            return
        if step % trainer.log_every_n_steps and not trainer.should_stop:
            return
        self._last_logged_step = step
        pl_module.log_dict(step_size_logs(self._optimizers), on_step=True, on_epoch=False, logger=True)
