"""Run folders: the resolver that names them, and reading a finished one back.

conf/hydra/default.yaml joins a folder's parts with ``${path_join:...}``. Whatever composes that
config (the training entry point, the reproduction pipeline, the tests) registers it first with
:func:`register_resolvers`. :func:`read_run` gives a folder's logged rows, as runs.csv holds them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf


class OutsideRunRoot(ValueError):
    """An override's value would put a run folder outside run_root."""


def path_join(*parts: object) -> str:
    """The parts joined by ``/``, skipping empty ones (no experiment, no overrides besides the seed).

    The parts after the first (run_root) come from the config and the command line's overrides: a
    ``..`` folder in them is refused (OutsideRunRoot), before Hydra makes any folder, so that no
    value (``logger.wandb.tags=[../../x]``) puts a run folder, its checkpoint and its records
    outside run_root.
    """
    kept = [str(part) for part in parts if part not in (None, "")]
    for part in kept[1:]:
        if ".." in part.split("/"):
            culprits = [piece for piece in part.split(",") if ".." in piece.split("/")] or [part]
            raise OutsideRunRoot(
                f"the run folder's name would leave run_root: {', '.join(culprits)} holds a '..' folder, and run "
                "folders are named from the overrides (conf/hydra/default.yaml). Give that value without '..' (a "
                "path relative to where you run, or an absolute one); nothing was created")
    return "/".join(kept)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("path_join"):
        OmegaConf.register_new_resolver("path_join", path_join)


def read_run(folder: Path) -> list[dict[str, str]]:
    """The run's metrics.csv rows, each with its status from meta.json ("finished", "failed", ...);
    no rows if it has logged none yet. A finished run whose meta.json was lost or damaged gets it back
    from its final checkpoint (rebuild_meta); an unfinished one without it reads "unknown"."""
    meta, metrics = folder / "meta.json", folder / "metrics.csv"
    if not metrics.exists():
        return []
    problem = meta_problem(meta)
    if problem is not None and rebuild_meta(folder):
        problem = None
    if problem is not None and problem != "missing":
        raise ValueError(f"{meta} cannot be read ({problem}): run the run's command again to rewrite it")
    status = "unknown" if problem == "missing" else json.loads(meta.read_text()).get("status", "unknown")
    with open(metrics, newline="") as f:
        return [{**row, "status": status} for row in csv.DictReader(f)]


def meta_problem(meta: Path) -> str | None:
    """None if meta.json holds a JSON object; else "missing", or why it cannot be read."""
    if not meta.exists():
        return "missing"
    try:
        record = json.loads(meta.read_text())
    except ValueError as error:  # UnicodeDecodeError is one
        return f"{type(error).__name__}: {error}"
    return None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"


def rebuild_meta(folder: Path) -> bool:
    """Write a lost meta.json of a finished run from its final checkpoint; True if it did."""
    from experiments import checkpoint  # here: torch only where a checkpoint is read
    from experiments.loggers import write_json

    path = folder / "checkpoint.pt"
    if not path.exists():
        return False
    state = checkpoint.load(str(path))
    if not state.get("finished"):
        return False
    write_json(meta_from_checkpoint(state), str(folder / "meta.json"))
    return True


def meta_from_checkpoint(state: Mapping[str, Any]) -> dict[str, Any]:
    """meta.json of a finished run, from its final checkpoint (when the file was lost)."""
    config = state["config"]
    return {"seed": config.get("seed"), "status": "finished", "step": state["step"], "summary": state["summary"],
            "config_sha256": config_digest(config), "code_sha256": state.get("code_sha256"),
            "code_changes": state.get("code_changes", []), "rebuilt_from_checkpoint": True}


# -- a run's identity: its whole resolved configuration, and the code that runs it --------------------

# The config sections a run computes from. Everything else in a composed config names folders, draws
# figures or feeds interpolations (run_root, run_group, logger, figure, tuning, ...).
IDENTITY_SECTIONS = ("dataset", "model", "optimizer", "trainer", "seed")
# Keys of those sections that may change between the jobs of one run: where and how fast it runs,
# never what it computes (conf/hydra/default.yaml leaves them out of the folder's name too).
MAY_CHANGE = ("trainer.max_time", "trainer.device", "trainer.checkpoint_every", "trainer.num_workers",
              "trainer.progress_bar", "trainer.resume_across_code_change")
# The code whose version a run records: the library and the harness (conf/ is in the config).
CODE_PACKAGES = ("metaopt", "experiments")
_REPOSITORY = Path(__file__).resolve().parents[1]


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat {dotted key: value} of a resolved config that makes a run what it is."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                visit(f"{prefix}.{key}", item)
        elif prefix not in MAY_CHANGE:
            flat[prefix] = value

    for section in IDENTITY_SECTIONS:
        if section in config:
            visit(section, config[section])
    return flat


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of identity(config), as meta.json and the checkpoint record it."""
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=repr).encode()).hexdigest()


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], limit: int = 12) -> list[str]:
    """'key: recorded -> current' for each identity key where two resolved configs differ."""
    old, new = identity(recorded), identity(current)
    unset = "(unset)"
    changed = [f"{key}: {old.get(key, unset)!r} -> {new.get(key, unset)!r}"
               for key in sorted(old.keys() | new.keys()) if old.get(key, unset) != new.get(key, unset)]
    return changed[:limit] + ([f"... and {len(changed) - limit} more"] if len(changed) > limit else [])


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """SHA-256 of the library's and the harness's Python files (path and bytes): the code version a run
    records, whether or not the repository is a git checkout, committed or not."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((_REPOSITORY / package).rglob("*.py")):
            digest.update(f"{path.relative_to(_REPOSITORY)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# -- a sweep's manifest ------------------------------------------------------------------------------


def sweep_arguments(arguments: Iterable[str]) -> list[str]:
    """A sweep's command-line overrides that make it what it is: sorted, without where it runs
    (run_root) and without Hydra's own (hydra.*, hydra/...)."""
    return sorted(a for a in arguments if not a.lstrip("+~").startswith(("hydra.", "hydra/", "run_root=")))


def manifest_path(run_root: str, run_group: str, arguments: Iterable[str]) -> Path:
    """Where the grids sweeper writes the manifest of a sweep (its runs, their folders, the settings its
    tuning chose): one per run group and command line, so that sweeps with other overrides keep theirs."""
    digest = hashlib.sha256("\n".join(sweep_arguments(arguments)).encode()).hexdigest()[:16]
    return Path(run_root) / run_group / f"sweep-{digest}.json"
