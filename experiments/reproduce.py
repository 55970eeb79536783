"""The paper's items: conf/experiment/<item>.yaml composed at a scale.

Each item lists its runs as named grids; experiments.sweeps expands them as the sweeper does.

    cfg = compose_experiment("fig1", "mini")
    for run in expected_runs(cfg): print(run.grid, run.arm, run.key)   # experiments.sweeps
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from experiments.run_folder import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
register_resolvers()  # the configs composed here and by their users name run folders (conf/hydra/default.yaml)
# The paper's items (and ours beyond it) are the files of conf/experiment/, in natural order (fig2 before fig10).
ITEMS = tuple(sorted((path.stem for path in (CONF / "experiment").glob("*.yaml")),
                     key=lambda name: (name.rstrip("0123456789"), int("0" + name[len(name.rstrip("0123456789")):]))))
SCALES = ("full", "mini", "smoke")


def compose_experiment(item: str, scale: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/train.yaml with experiment=<item> and scale=<scale>, the hydra node included."""
    if item not in ITEMS:
        raise ValueError(f"unknown paper item {item!r}: use one of {', '.join(ITEMS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={item}", f"scale={scale}", *overrides],
                       return_hydra_config=True)
