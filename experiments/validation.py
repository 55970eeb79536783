"""Every trainer, logger, dataset and model value of a composed config, checked before a run does any work.

``check_config(cfg)`` runs first in ``train``: before the run folder is created, data is read or
a model is built. Each error names the key, the value it got and what is allowed, and a key
the trainer does not know (``+trainer.max_step=100``) is named with the closest known one, as
Hydra itself does for keys without the ``+``. Optimizer keywords are checked by the optimizers.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Setting:
    """What one config value may be: a type, optionally a range or a set of choices, optionally null."""

    kind: str  # "int", "number", "bool", "str" or "list"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes low itself
    high_open: bool = False
    choices: tuple = ()
    pattern: str | None = None  # a regular expression a string must match in full
    nullable: bool = False
    meaning: str = ""  # what null (or a special value) means, appended to the description

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices:
            return value in self.choices
        kind_ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list": isinstance(value, (list, tuple)),
        }[self.kind]
        if not kind_ok:
            return False
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def allowed(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(str(choice) for choice in self.choices)
        else:
            text = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
                    "list": "a list"}[self.kind]
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.pattern is not None:
            text += f" of the form {self.meaning}"
        elif self.meaning:
            text += f" ({self.meaning})"
        return text + (", or null" if self.nullable else "")


# conf/trainer/default.yaml, key by key (tests/experiments/test_validation.py keeps the two in step)
TRAINER = {
    "max_steps": Setting("int", low=1, nullable=True, meaning="optimizer steps; null when trainer.epochs is set"),
    "epochs": Setting("int", low=1, nullable=True, meaning="replaces max_steps when set"),
    "max_time": Setting("number", low=0, nullable=True, meaning="wall-clock seconds of this job"),
    "log_every": Setting("int", low=1),
    "eval_every": Setting("int", low=0, nullable=True, meaning="0 or null: never"),
    "eval_batches": Setting("int", low=1, nullable=True, meaning="null: the whole test split"),
    "checkpoint_every": Setting("int", low=0, nullable=True, meaning="0 or null: only when stopped and at the end"),
    "grad_clip": Setting("number", low=0, low_open=True, nullable=True, meaning="null: no clipping"),
    "precision": Setting("str", choices=("fp32", "bf16", "fp16")),
    "compile": Setting("bool"),
    "device": Setting("str", pattern=r"auto|cpu|mps|cuda(:\d+)?", meaning="auto, cpu, mps, cuda or cuda:<index>"),
    "num_workers": Setting("int", low=0),
    "progress_bar": Setting("bool"),
    "resume_across_code_change": Setting("bool"),
}

# conf/logger/*.yaml
LOGGER = {"csv": Setting("bool")}  # and wandb: null, or the settings below
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # what wandb.init accepts
WANDB = {
    "project": Setting("str"),
    "entity": Setting("str", nullable=True),
    "mode": Setting("str", choices=WANDB_MODES, nullable=True, meaning="null: WANDB_MODE, else online when logged in"),
    "tags": Setting("list"),
    "group": Setting("str", nullable=True),
    "job_type": Setting("str", nullable=True),
    "notes": Setting("str", nullable=True),
}

# The keywords of the dataset builders (experiments/data/), wherever a builder takes them; a
# keyword a builder does not take is refused from its signature.
DATASET = {
    "batch_size": Setting("int", low=1),
    "test_fraction": Setting("number", low=0, high=1, low_open=True, high_open=True),
    "seed": Setting("int"),
    "augment": Setting("bool"),
    "max_seq_len": Setting("int", low=1),
    "vocab_size": Setting("int", low=1, high=2**16, meaning="token files hold uint16 ids"),
    "root": Setting("str"),
    "path": Setting("str"),
    "cache_dir": Setting("str"),
}


# The keywords of the model builders (experiments/models/), as for the datasets.
MODEL = {
    "dim": Setting("int", low=1),
    "n_layers": Setting("int", low=1),
    "n_heads": Setting("int", low=1),
    "n_kv_heads": Setting("int", low=1, nullable=True, meaning="null: n_heads"),
    "multiple_of": Setting("int", low=1),
    "norm_eps": Setting("number", low=0, low_open=True),
    "dropout": Setting("number", low=0, high=1, high_open=True),
    "width": Setting("int", low=1),
    "hidden": Setting("list"),
    "channels": Setting("list"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError naming the first key whose value is not allowed, or that nothing reads."""
    _check_time_independent(OmegaConf.to_container(cfg, resolve=False))
    _check_section(cfg.trainer, "trainer", TRAINER, "conf/trainer/default.yaml")
    if cfg.trainer.max_steps is None and cfg.trainer.epochs is None:
        raise ValueError("set the length of the run: trainer.max_steps=<steps> or trainer.epochs=<epochs>")
    _check_value("seed", cfg.seed, Setting("int"))

    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    _check_section({k: v for k, v in logger.items() if k != "wandb"}, "logger", LOGGER, "conf/logger/")
    if "wandb" not in logger:
        raise ValueError("logger.wandb is missing: choose a logger with logger=csv, logger=wandb or logger=none")
    if logger["wandb"] is not None:
        _check_section(logger["wandb"], "logger.wandb", WANDB, "conf/logger/wandb.yaml")
        environment_mode = os.environ.get("WANDB_MODE")
        if logger["wandb"]["mode"] is None and environment_mode is not None and environment_mode not in WANDB_MODES:
            raise ValueError(f"the environment variable WANDB_MODE={environment_mode!r} is not allowed: "
                             f"{WANDB['mode'].allowed()}")

    _check_builder(cfg.dataset, "dataset", DATASET)
    _check_builder(cfg.model, "model", MODEL)


def _check_time_independent(node: Any, prefix: str = "") -> None:
    """Refuse a value drawn from the clock (${now:...}): each resolution gives another one, so the run
    folder's name, the recorded config and the run itself would disagree (a seed=29 folder running seed 31)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_time_independent(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_time_independent(value, f"{prefix}[{index}]")
    elif isinstance(node, str) and "${now:" in node.replace(" ", ""):
        raise ValueError(f"{prefix}={node!r} is not allowed: a value drawn from the clock changes at each use, so "
                         "the run folder's name, its recorded config and the run would each get another one. Give "
                         f"the value itself (e.g. {prefix}=$(date +%s) in the shell)")


def _check_section(section: Any, prefix: str, settings: dict[str, Setting], defined_in: str) -> None:
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section
    for key, value in values.items():
        if key not in settings:
            raise ValueError(_unknown_key(prefix, key, list(settings), defined_in))
        _check_value(f"{prefix}.{key}", value, settings[key])


def _check_builder(node: DictConfig, prefix: str, settings: dict[str, Setting]) -> None:
    """A ``_target_`` node: every key is a keyword of the builder, every known keyword in its range."""
    builder = get_method(node._target_)
    parameters = inspect.signature(builder).parameters
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    for key, value in values.items():
        if key not in parameters:
            raise ValueError(_unknown_key(prefix, key, list(parameters), f"{node._target_}()"))
        if key in settings:
            _check_value(f"{prefix}.{key}", value, settings[key])


def _check_value(key: str, value: Any, setting: Setting) -> None:
    if not setting.accepts(value):
        shown = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
        raise ValueError(f"{key}={shown} is not allowed: {key} must be {setting.allowed()}")


def _unknown_key(prefix: str, key: str, known: list[str], defined_in: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"Did you mean {prefix}.{close[0]}? " if close else ""
    return (f"{prefix}.{key} is not a setting that anything reads, so it would be ignored. {hint}"
            f"The settings of {prefix} ({defined_in}) are: {', '.join(known)}")
