"""MetaOptimize in transformers' ``Trainer``: the learned step sizes in its logs, and a warning about its schedule.

``Trainer(..., optimizers=(MetaOptimize(...), None))`` builds a learning-rate scheduler from
``TrainingArguments.lr_scheduler_type``, ``"linear"`` by default, on the optimizer's ``lr``. For MetaOptimize
``lr`` multiplies the learned step size, so the default schedule takes the step size to 0 over the run, and the
``learning_rate`` Trainer logs is that multiplier. Pass ``lr_scheduler_type="constant"`` (or
``optimizers=(optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))``).

Use::

    trainer = Trainer(model, TrainingArguments(..., lr_scheduler_type="constant"), optimizers=(optimizer, None), ...)
    log_step_sizes(trainer)  # or Trainer(..., callbacks=[StepSizeCallback()]): see StepSizeCallback
    trainer.train()

Every training log (each ``logging_steps``) then holds ``optimizer.step_sizes()`` read at that step, under its
names: ``step_size`` (``blocks="scalar"``), ``step_size/<block>`` (``param_group``), ``step_size/<param>`` or
``step_size/<param>/{min,median,max}`` (per tensor); reporting integrations add their prefix (``train/step_size``
in TensorBoard and W&B).
"""

from __future__ import annotations

import warnings

from transformers import Trainer, TrainerCallback

from metaopt.integrations._common import StepSizeScheduleWarning, step_size_logs, unwrap, warn_if_decaying

__all__ = ["StepSizeCallback", "StepSizeScheduleWarning", "log_step_sizes"]


class StepSizeCallback(TrainerCallback):
    """Adds the learned step sizes of the Trainer's MetaOptimize to each of its training logs, and warns once,
    at train begin, when the Trainer's scheduler will scale them down (``StepSizeScheduleWarning``).

    It finds the MetaOptimize itself, inside accelerate's ``AcceleratedOptimizer``. The values go into the logs
    that Trainer hands to its callbacks, so into ``trainer.state.log_history`` and ``trainer_state.json``, and to
    every callback after this one. Trainer places the reporting integrations of ``report_to`` (TensorBoard,
    W&B, ...) before the callbacks passed as ``callbacks=[...]``: add it with :func:`log_step_sizes` so that
    they see the step sizes too (passed in ``callbacks=`` with a ``report_to``, it warns at train begin).
    """

    def __init__(self) -> None:
        self.ahead_of_reporting = False  # set by log_step_sizes
        self._optimizer = None

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._optimizer = unwrap(optimizer)
        if self._optimizer is None:
            warnings.warn(f"metaopt: StepSizeCallback logs nothing: the Trainer's optimizer is "
                          f"{type(optimizer).__name__}, not MetaOptimize (pass optimizers=(MetaOptimize(...), None))",
                          stacklevel=2)
            return
        warn_if_decaying(lr_scheduler, state.max_steps, _describe(lr_scheduler, args), self._optimizer)
        if args.report_to and not self.ahead_of_reporting:
            warnings.warn(f"metaopt: StepSizeCallback runs after Trainer's reporting callbacks ({args.report_to}), so "
                          "the step sizes reach trainer.state.log_history but not them: add it with "
                          "metaopt.integrations.huggingface.log_step_sizes(trainer) instead of callbacks=[...]",
                          stacklevel=2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._optimizer is None or logs is None or "loss" not in logs:  # not a training log
            return
        step_sizes = step_size_logs([self._optimizer])
        logs.update(step_sizes)
        # Trainer.log appended a copy of these logs to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(step_sizes)


def _describe(lr_scheduler, args) -> str:
    """How the warning names the scheduler: by lr_scheduler_type when transformers built it."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", [])
    if lambdas and all(getattr(getattr(f, "func", f), "__module__", "").startswith("transformers") for f in lambdas):
        name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # a SchedulerType enum
        return f"Trainer's schedule (TrainingArguments.lr_scheduler_type={name!r})"
    return f"the Trainer's scheduler {type(lr_scheduler).__name__}"


def log_step_sizes(trainer: Trainer) -> StepSizeCallback:
    """Adds a :class:`StepSizeCallback` to ``trainer`` ahead of its other callbacks, so that its reporting
    integrations (``report_to``: TensorBoard, W&B, ...) log the step sizes too. Returns the callback."""
    callback = StepSizeCallback()
    callback.ahead_of_reporting = True
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
