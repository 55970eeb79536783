"""Bad trainer, logger, dataset and model values stop a run before it does any work, naming the key,
the value and what is allowed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.trainer import train
from experiments.validation import TRAINER
from tests.experiments.helpers import CONF, TINY, compose_train

REPO = Path(__file__).resolve().parents[2]

BAD_VALUES = {
    # override: what the error must say
    "trainer.max_steps=0": r"trainer.max_steps=0 is not allowed: trainer.max_steps must be an integer >= 1",
    "trainer.max_steps=-5": r"trainer.max_steps=-5 is not allowed: .* an integer >= 1",
    "trainer.max_steps=abc": r"trainer.max_steps='abc' \(str\) is not allowed: .* an integer >= 1",
    "trainer.max_steps=1e4": r"trainer.max_steps=10000.0 is not allowed: .* an integer",
    "+trainer.max_step=100": r"trainer.max_step is not a setting that anything reads.*Did you mean trainer.max_steps\?",
    "trainer.grad_clip=0": r"trainer.grad_clip=0 is not allowed: .* a finite number > 0 \(null: no clipping\), or null",
    "trainer.grad_clip=nan": r"trainer.grad_clip=nan is not allowed: .* a finite number > 0",
    "trainer.grad_clip=-1": r"trainer.grad_clip=-1 is not allowed",
    "trainer.eval_batches=0": r"trainer.eval_batches=0 is not allowed: .* an integer >= 1",
    "trainer.log_every=0": r"trainer.log_every=0 is not allowed",
    "trainer.max_time=-1": r"trainer.max_time=-1 is not allowed: .* a finite number >= 0",
    "trainer.precision=fp8": r"trainer.precision='fp8' \(str\) is not allowed: .* one of fp32, bf16, fp16",
    "trainer.device=gpu": r"trainer.device='gpu' \(str\) is not allowed: .* auto, cpu, mps, cuda or cuda:<index>",
    "trainer.compile=yes": r"trainer.compile='yes' \(str\) is not allowed: .* true or false",
    "trainer.num_workers=-1": r"trainer.num_workers=-1 is not allowed",
    "dataset.batch_size=0": r"dataset.batch_size=0 is not allowed: dataset.batch_size must be an integer >= 1",
    "dataset.batch_size=-1": r"dataset.batch_size=-1 is not allowed",
    "dataset.test_fraction=1.5": r"dataset.test_fraction=1.5 is not allowed: .* a finite number in \(0, 1\)",
    "+dataset.batchsize=8": r"dataset.batchsize is not a setting .*Did you mean dataset.batch_size\?.*experiments.data.digits",
    "+model.hiden=[64]": r"model.hiden is not a setting .*Did you mean model.hidden\?.*experiments.models.mlp",
    "model=llama2c model.dropout=1.0": r"model.dropout=1.0 is not allowed: .* a finite number in \[0, 1\)",
    "model=llama2c model.n_heads=0": r"model.n_heads=0 is not allowed: .* an integer >= 1",
    "seed=abc": r"seed='abc' \(str\) is not allowed: seed must be an integer",
    "logger=wandb logger.wandb.mode=offlin": r"logger.wandb.mode='offlin' \(str\) is not allowed: .* one of online, "
                                             r"offline, disabled, shared",
    "logger.csv=maybe": r"logger.csv='maybe' \(str\) is not allowed",
}


@pytest.mark.parametrize("override", BAD_VALUES)
def test_a_bad_value_is_named_before_any_work(override, tmp_path):
    cfg = compose_train(*TINY, *override.split())
    with pytest.raises(ValueError, match=BAD_VALUES[override]):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no run folder, no data read, no model built


def test_the_length_of_the_run_is_required(tmp_path):
    with pytest.raises(ValueError, match="set the length of the run: trainer.max_steps"):
        train(compose_train(*TINY, "trainer.max_steps=null"), str(tmp_path / "run"))


def test_a_bad_wandb_mode_in_the_environment_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(ValueError, match=r"the environment variable WANDB_MODE='offlin' is not allowed: one of online"):
        train(compose_train(*TINY, "logger=wandb"), str(tmp_path / "run"))


def test_an_empty_test_split_is_named(tmp_path):
    # 0.0001 of 1,797 digits rounds to no test image
    with pytest.raises(ValueError, match=r"the test split of experiments.data.digits is empty.*trainer.eval_every=0"):
        train(compose_train(*TINY, "dataset.test_fraction=0.0001"), str(tmp_path / "run"))
    result = train(compose_train(*TINY, "dataset.test_fraction=0.0001", "trainer.eval_every=0"), str(tmp_path / "ok"))
    assert result.summary["status"] == "finished"


def test_every_trainer_setting_is_checked():
    """The checks cover conf/trainer/default.yaml key for key, and its defaults pass them."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    assert set(defaults) == set(TRAINER)
    assert all(TRAINER[key].accepts(value) for key, value in defaults.items())


def test_the_cli_names_a_misspelt_added_key_before_any_work(tmp_path):
    """`+trainer.max_step=100`, the spelling Hydra's own hint suggests for a key it does not know."""
    command = [sys.executable, "-m", "experiments.train", f"run_root={tmp_path}", "+trainer.max_step=100",
               "trainer.progress_bar=false"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "trainer.max_step is not a setting that anything reads" in result.stderr
    assert "Did you mean trainer.max_steps?" in result.stderr
    # Hydra makes the folder and its .hydra/ record of the command; the run itself wrote nothing
    assert not [path for path in tmp_path.rglob("*") if path.name in ("meta.json", "metrics.csv", "checkpoint.pt")]
