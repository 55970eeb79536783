"""The learned step sizes in the logs of training frameworks, and a warning when their schedule would decay them.

- :mod:`metaopt.integrations.huggingface`: ``StepSizeCallback`` and ``log_step_sizes(trainer)`` for
  transformers' ``Trainer``.
- :mod:`metaopt.integrations.lightning`: ``StepSizeCallback`` for Lightning's ``Trainer``.

A framework's learning-rate scheduler acts on the param groups' ``lr``, which for ``MetaOptimize`` is a
multiplier of the learned step size (default 1.0): a schedule that decays it to 0 drives the step size
to 0 whatever MetaOptimize learns, and the ``learning_rate`` the framework logs is that multiplier, not
the step size. Each module imports its framework only when it is imported itself; ``import metaopt``
imports neither.
"""
