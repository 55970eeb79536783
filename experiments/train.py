"""Train one model with one optimizer: the entry point of every run.

    python -m experiments.train dataset=digits model=mlp optimizer=metaopt_adamw_adam trainer.max_steps=500
    python -m experiments.train -m optimizer=adamw,metaopt_adamw_adam seed=0,1,2     # a sweep
    torchrun --nproc_per_node=4 -m experiments.train dataset=cifar10 model=resnet18_cifar ...

Hydra composes the config from conf/ (conf/train.yaml lists the groups); the run folder is
named from the overrides and the seed (conf/hydra/default.yaml), and running the same
command again resumes from the checkpoint in it. The loop is experiments/trainer.py.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.run_folder import register_resolvers
from experiments.trainer import train

register_resolvers()  # before hydra.main composes conf/hydra/default.yaml, which names the run folder


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = train(cfg, HydraConfig.get().runtime.output_dir)
    if result.summary["status"] in ("preempted", "stopped"):
        sys.exit(3)  # a stop signal or out of max_time: not finished, re-run (or requeue) to continue


if __name__ == "__main__":
    main()
