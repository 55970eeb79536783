"""Train one model with one optimizer: the entry point of every run.

    python -m experiments.train dataset=digits model=mlp optimizer=metaopt_adamw_adam trainer.max_steps=500
    python -m experiments.train -m optimizer=adamw,metaopt_adamw_adam seed=0,1,2     # a sweep
    torchrun --nproc_per_node=4 -m experiments.train dataset=cifar10 model=resnet18_cifar ...

Hydra composes the config from conf/ (conf/train.yaml lists the groups); the run folder is
named from the overrides and the seed (conf/hydra/default.yaml), and running the same
command again resumes from the checkpoint in it. The loop is experiments/trainer.py.
"""

import gc
import os
import shutil
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.run_folder import register_resolvers
from experiments.trainer import train
from experiments.validation import check_config

register_resolvers()  # before hydra.main composes conf/hydra/default.yaml, which names the run folder


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        check_config(cfg)
    except ValueError:
        discard_unused_folder(run_dir, cfg.get("run_root"))  # a refused command leaves no folder behind
        raise
    try:
        status = train(cfg, run_dir).summary["status"]
    except KeyboardInterrupt:
        # meta.json says "interrupted": not finished, not diverged; its last checkpoint continues it
        print(f"\ninterrupted (Ctrl-C): {run_dir} is recorded as interrupted; run the same command again to "
              "continue from its last checkpoint", file=sys.stderr)
        sys.exit(130)
    # FSDP2's modules hold their process group in reference cycles: free them now, while the interpreter
    # is alive; collected during its exit, a gloo group's worker thread releasing a tensor aborts the process
    gc.collect()
    if status in ("preempted", "stopped"):
        sys.exit(3)  # a stop signal or out of max_time: not finished, re-run (or requeue) to continue


def discard_unused_folder(run_dir: str, run_root: str | None) -> None:
    """Remove what Hydra wrote for a command refused before any work (its .hydra/ record and the job's
    log), then the folder and the parents it made, where that leaves them empty, up to run_root."""
    if not os.path.isdir(run_dir):
        return
    shutil.rmtree(os.path.join(run_dir, ".hydra"), ignore_errors=True)
    log = os.path.join(run_dir, f"{HydraConfig.get().job.name}.log")
    if os.path.isfile(log) and not os.path.islink(log):
        os.remove(log)
    stop = os.path.abspath(run_root) if run_root else None
    folder = os.path.abspath(run_dir)
    while stop is not None and folder.startswith(stop + os.sep) and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)

if __name__ == "__main__":
    main()
