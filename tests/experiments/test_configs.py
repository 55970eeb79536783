"""Every optimizer config composes and trains; bad configs fail with a message naming the problem."""

import json

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from experiments.adapters import Adapter
from experiments.data import digits
from experiments.trainer import train
from tests.experiments.helpers import CONF, TINY, compose_train, finite, read_metrics

OPTIMIZERS = sorted(path.stem for path in (CONF / "optimizer").glob("*.yaml"))


def overrides_for(name: str) -> list[str]:
    overrides = [*TINY, f"optimizer={name}"]
    if name.endswith("_6blocks"):
        # the six named blocks are ResNet-18's modules (stem, layer1-4, head)
        overrides += ["model=resnet18_cifar", "dataset.batch_size=8", "trainer.eval_batches=1"]
    if name == "adamw_cosine":
        overrides.append("optimizer.adapter.scheduler.warmup_steps=2")  # the default outlasts 4 steps
    return overrides


def test_every_paper_row_has_a_config():
    pairs = ["adamw_adam", "lion_lion", "rmsprop_adam", "sgdm_adam", "adamw_lion", "sgdm_lion"]
    expected = {f"metaopt_{pair}" for pair in pairs} | {f"metaopt_{pair}_6blocks" for pair in pairs[:5]}
    expected |= {"adamw", "adamw_cosine", "lion", "rmsprop", "sgdm", "dog", "prodigy"}
    expected |= {f"mechanic_{base}" for base in ("sgdm", "lion", "adamw")}
    expected |= {f"gdtuo_{base}_adam" for base in ("rmsprop", "adam", "sgdm")}
    assert expected <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_config_trains(name, tmp_path):
    result = train(compose_train(*overrides_for(name)), str(tmp_path))

    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == ["0", "2", "4"]
    step_size_keys = [key for key in rows[0] if key.startswith("step_size")]
    assert step_size_keys
    for row in rows[1:]:
        assert finite(row["train/loss"]) and 0 <= float(row["train/acc"]) <= 1
        assert all(finite(row[key]) for key in step_size_keys)
    assert finite(rows[-1]["test/loss"])
    assert result.summary["status"] == "finished" and result.summary["step"] == 4
    assert isinstance(result.adapter, Adapter)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and "hostname" not in meta
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoint.pt").exists()


def test_learned_step_sizes_move_and_fixed_ones_do_not(tmp_path):
    """The logged step size is the optimizer's own: MetaOptimize's changes, AdamW's stays lr."""
    learned = train(compose_train(*TINY, "optimizer=metaopt_adamw_adam"), str(tmp_path / "learned"))
    fixed = train(compose_train(*TINY, "optimizer=adamw", "optimizer.lr=3e-4"), str(tmp_path / "fixed"))
    assert learned.summary["step_size"] != 1e-6
    assert learned.summary["step_size"] == pytest.approx(learned.adapter.optimizer.step_sizes()["step_size"])
    assert fixed.summary["step_size"] == 3e-4


def test_wrong_config_key_names_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.learning_rate"):
        compose_train("trainer.learning_rate=0.1")


def test_wrong_optimizer_keyword_names_the_keyword(tmp_path):
    cfg = compose_train(*TINY, "optimizer=metaopt_adamw_adam", "+optimizer.alpha_0=1e-5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha_0'"):
        train(cfg, str(tmp_path))


def test_keyword_the_rule_does_not_use_says_which_rules_do(tmp_path):
    cfg = compose_train(*TINY, "optimizer=metaopt_adamw_adam", "optimizer.base=lion")
    with pytest.raises(ValueError, match="normalizer does not apply to base 'lion'"):
        train(cfg, str(tmp_path))


def test_unknown_optimizer_lists_the_available_ones():
    with pytest.raises(MissingConfigException, match="optimizer/adamw_typo") as error:
        compose_train("optimizer=adamw_typo")
    assert "metaopt_adamw_adam" in str(error.value)


@pytest.mark.parametrize(
    "dataset, root_key, command",
    [
        ("cifar10", "root", "torchvision.datasets.CIFAR10"),
        ("tinystories", "root", "scripts/prepare_tinystories.py"),
        ("text_corpus", "path", "scripts/prepare_text.py"),
    ],
)
def test_missing_dataset_names_the_path_and_the_command(dataset, root_key, command, tmp_path):
    missing = tmp_path / "nowhere"
    cfg = compose_train(*TINY, f"dataset={dataset}", f"dataset.{root_key}={missing}")
    with pytest.raises(FileNotFoundError, match="Prepare it with") as error:
        train(cfg, str(tmp_path / "run"))
    assert str(missing) in str(error.value) and command in str(error.value)
    assert not (tmp_path / "run" / "meta.json").exists()  # no record of a run that never started


def test_bad_trainer_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="trainer.precision"):
        train(compose_train(*TINY, "trainer.precision=fp8"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="set the length of the run: trainer.max_steps"):
        train(compose_train(*TINY, "trainer.max_steps=null"), str(tmp_path / "b"))


def test_epochs_replace_max_steps(tmp_path):
    result = train(compose_train(*TINY, "trainer.epochs=1", "trainer.eval_every=0"), str(tmp_path))
    assert result.summary["step"] == len(digits().train) // 64  # whole batches of the training split


def test_what_an_optimizer_cannot_do_is_refused_with_the_reason(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of text\n" * 200)
    tied = compose_train(*TINY, "optimizer=gdtuo_adam_adam", "dataset=text_corpus", f"dataset.path={corpus}",
                         f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.max_seq_len=16", "model=tiny_transformer")
    with pytest.raises(ValueError, match="gdtuo cannot run here: .*ties weights"):
        train(tied, str(tmp_path / "tied"))
    with pytest.raises(ValueError, match="gdtuo cannot run here: fp16"):
        train(compose_train(*TINY, "optimizer=gdtuo_adam_adam", "trainer.precision=fp16"), str(tmp_path / "fp16"))
