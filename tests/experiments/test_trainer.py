"""The training loop: bit-for-bit resume after preemption, W&B offline logging, DDP, divergence."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from experiments import checkpoint
from experiments.trainer import train
from tests.experiments.helpers import (TINY, assert_same_state, compose_train, computed_columns, finite, long_run,
                                       read_metrics, read_wandb_history, rows_if_any, sigterm_when_logged,
                                       train_until_preempted)

REPO = Path(__file__).resolve().parents[2]


RESUME_CASES = {
    # MetaOptimize's trace and meta state, and the baselines whose state needs care
    "metaopt": ["optimizer=metaopt_adamw_adam"],
    "mechanic": ["optimizer=mechanic_adamw"],  # its checkpoint keys are re-keyed
    "dog": ["optimizer=dog"],  # its averager is part of the checkpoint
    "cosine": ["optimizer=adamw_cosine", "optimizer.adapter.scheduler.warmup_steps=50"],  # the schedule's position
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_after_sigterm_is_bit_identical(case, tmp_path):
    cfg = compose_train(*long_run(*RESUME_CASES[case]))
    reference = train(cfg, str(tmp_path / "reference"))

    run_dir = tmp_path / "preempted"
    stopped = train_until_preempted(cfg, run_dir)
    assert stopped.summary["status"] == "preempted"
    assert 20 <= stopped.summary["step"] < 300, "the run was not stopped mid-way"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["status"], meta["step"], meta["signal"]) == ("preempted", stopped.summary["step"], "SIGTERM")

    resumed = train(cfg, str(run_dir))  # the same command again
    assert resumed.summary["status"] == "finished" and resumed.summary["step"] == 300
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(tmp_path / "reference"))
    assert_same_state(resumed, reference)


def test_sigusr2_checkpoints_then_reaches_the_handler_installed_before(tmp_path):
    """submitit's SIGUSR2 (a sweep task's time limit): the run checkpoints at the end of the
    current step and records "preempted", then the handler that was there before (submitit's
    requeue) gets the signal, once; the run resumes from that step."""
    cfg = compose_train(*long_run("optimizer=metaopt_sgdm_adam"))
    run_dir = tmp_path / "preempted"
    seen = []

    def requeue(signum, frame):  # what submitit's handler finds when the trainer hands over
        meta = json.loads((run_dir / "meta.json").read_text())
        seen.append((signal.Signals(signum).name, meta["status"], meta["step"]))

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        watcher = sigterm_when_logged(run_dir, step=20, signum=signal.SIGUSR2)
        stopped = train(cfg, str(run_dir))
        watcher.join()
        assert signal.getsignal(signal.SIGUSR2) is requeue  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stopped.summary["status"] == "preempted" and 20 <= stopped.summary["step"] < 100
    assert seen == [("SIGUSR2", "preempted", stopped.summary["step"])]
    resumed = train(cfg, str(run_dir))
    assert resumed.summary["step"] == 300
    reference = train(cfg, str(tmp_path / "reference"))
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(tmp_path / "reference"))
    assert_same_state(resumed, reference)


def test_a_signal_at_the_end_is_caught_until_the_run_is_recorded_finished(tmp_path):
    """A SIGTERM as the last step is logged lands in the trainer's handler, while the final
    checkpoint and meta.json are written; whatever handler comes after finds both finished."""
    cfg = compose_train(*long_run("optimizer=metaopt_sgdm_adam"))
    seen = []

    def after(signum, frame):
        meta = json.loads((tmp_path / "meta.json").read_text())
        seen.append((meta["status"], checkpoint.load(str(tmp_path / "checkpoint.pt"))["finished"]))

    previous = signal.signal(signal.SIGTERM, after)
    try:
        watcher = sigterm_when_logged(tmp_path, step=300)
        result = train(cfg, str(tmp_path))
        watcher.join()
        time.sleep(0.1)  # a signal sent after train() returned reaches `after` here
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.summary["status"] == "finished"
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "finished"
    assert all(record == ("finished", True) for record in seen), seen


def test_resume_restores_the_random_number_generators(tmp_path):
    """With dropout, the resumed run draws the same masks as the uninterrupted one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    cfg = compose_train(*long_run(
        "dataset=text_corpus", f"dataset.path={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.max_seq_len=32", "dataset.batch_size=8", "model=llama2c", "model.dim=32", "model.n_layers=1",
        "model.n_heads=2", "model.dropout=0.2", "optimizer=metaopt_lion_lion", "trainer.max_steps=120",
    ))
    reference = train(cfg, str(tmp_path / "reference"))
    stopped = train_until_preempted(cfg, tmp_path / "preempted")
    assert 20 <= stopped.summary["step"] < 120, "the run was not stopped mid-way"
    resumed = train(cfg, str(tmp_path / "preempted"))
    assert computed_columns(read_metrics(tmp_path / "preempted")) == computed_columns(read_metrics(tmp_path / "reference"))
    assert_same_state(resumed, reference)


def test_max_time_checkpoints_and_the_next_run_continues(tmp_path):
    cfg = compose_train(*long_run("optimizer=metaopt_sgdm_adam", "trainer.max_time=0"))
    first = train(cfg, str(tmp_path))
    assert first.summary["status"] == "stopped" and first.summary["step"] == 1
    second = train(compose_train(*long_run("optimizer=metaopt_sgdm_adam")), str(tmp_path))
    assert second.summary["status"] == "finished" and second.summary["step"] == 300
    again = train(compose_train(*long_run("optimizer=metaopt_sgdm_adam")), str(tmp_path))
    assert again.summary == second.summary  # a finished run is not run again


def test_resume_refuses_a_folder_of_another_configuration(tmp_path):
    train(compose_train(*TINY, "optimizer=adamw"), str(tmp_path))
    with pytest.raises(ValueError, match=r"another configuration.*\n  optimizer.lr: 1e-05 -> 0.1\n"):
        train(compose_train(*TINY, "optimizer=adamw", "optimizer.lr=0.1"), str(tmp_path))


def test_wandb_offline_logs_the_step_sizes(tmp_path, offline_wandb):
    cfg = compose_train(*TINY, "optimizer=metaopt_adamw_adam", "logger=wandb")
    train(cfg, str(tmp_path / "run"))

    (run_file,) = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = {row["step"]: row for row in read_wandb_history(run_file)}
    csv_rows = read_metrics(tmp_path / "run")
    assert sorted(logged) == [int(row["step"]) for row in csv_rows] == [0, 2, 4]
    for row in csv_rows:
        assert logged[int(row["step"])]["step_size"] == pytest.approx(float(row["step_size"]), rel=1e-12)
    assert logged[4]["step_size"] != logged[0]["step_size"]  # learned, not constant


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world_size: int, port: int, overrides: list[str], run_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result = train(compose_train(*overrides), run_dir)
    optimizer = result.adapter.optimizer
    torch.save({"model": result.model.state_dict(), "betas": [group["beta"] for group in optimizer.param_groups if "beta" in group],
                "summary": result.summary}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_gloo_processes_stay_identical(tmp_path):
    overrides = [*TINY, "optimizer=metaopt_adamw_adam", "trainer.max_steps=12", "trainer.log_every=4",
                 "trainer.eval_every=12", "trainer.device=cpu"]
    mp.spawn(_ddp_rank, args=(2, _free_port(), overrides, str(tmp_path / "ddp"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["betas"] and all(torch.equal(a, b) for a, b in zip(rank0["betas"], rank1["betas"]))
    for name, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][name]), name
    assert rank0["summary"] == {**rank1["summary"], "wall_s": rank0["summary"]["wall_s"], "memory/peak_mb": rank0["summary"]["memory/peak_mb"],
                                "time/step_ms": rank0["summary"]["time/step_ms"], "time/optimizer_ms": rank0["summary"]["time/optimizer_ms"]}

    # Two ranks of half a batch each average to the full batch's gradient: the same run as one
    # process, up to the order of floating-point sums.
    single = train(compose_train(*overrides), str(tmp_path / "single"))
    beta = single.adapter.optimizer.param_groups[0]["beta"]
    assert torch.allclose(rank0["betas"][0], beta, rtol=0, atol=1e-4)
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(tensor, rank0["model"][name], rtol=1e-4, atol=1e-6), name


def test_divergence_stops_with_the_cause_and_the_fix(tmp_path):
    cfg = compose_train(*TINY, "optimizer=adamw", "optimizer.lr=1e30", "trainer.max_steps=40")
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at step \d+: training diverged.*optimizer.lr"):
        train(cfg, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert rows[-1]["train/loss"] == "nan" and all(finite(row["train/loss"]) for row in rows[1:-1])
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "failed"


def test_learned_step_size_overflow_stops_with_the_cause_and_the_fix(tmp_path):
    # a meta step of 1000 in log space: beta leaves float range at the first meta update that grows it
    cfg = compose_train(*TINY, "optimizer=metaopt_adamw_adam", "optimizer.meta_lr=1e3", "trainer.log_every=1")
    with pytest.raises(FloatingPointError, match="step_size is inf at step 2: the learned step size diverged. Lower optimizer.meta_lr"):
        train(cfg, str(tmp_path))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, tmp_path):
    result = train(compose_train(*TINY, "optimizer=metaopt_lion_lion", f"trainer.precision={precision}",
                                 "trainer.grad_clip=1.0"), str(tmp_path))
    assert finite(str(result.summary["train/loss"])) and finite(str(result.summary["step_size"]))
    assert result.adapter.optimizer.param_groups[0]["beta"].dtype == torch.float32


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    eager = train(compose_train(*TINY, "optimizer=metaopt_adamw_adam"), str(tmp_path / "eager"))
    compiled = train(compose_train(*TINY, "optimizer=metaopt_adamw_adam", "trainer.compile=true"), str(tmp_path / "compiled"))
    for name, tensor in eager.model.state_dict().items():
        assert torch.allclose(tensor, compiled.model.state_dict()[name], rtol=1e-4, atol=1e-6), name


def test_cli_run_folder_is_named_from_the_overrides_and_the_seed(tmp_path):
    command = [sys.executable, "-m", "experiments.train", f"run_root={tmp_path}", "optimizer=lion", "seed=3",
               "trainer.max_steps=2", "trainer.eval_every=2", "trainer.device=cpu", "trainer.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    # the optimizer, the seed and the device are parts of the name or left out of it, not overrides
    run_dir = tmp_path / "digits" / "mlp" / "lion" / "trainer.eval_every=2,trainer.max_steps=2" / "seed=3"
    assert str(run_dir) in first.stdout
    assert {"config.yaml", "meta.json", "metrics.csv", "checkpoint.pt"} <= {p.name for p in run_dir.iterdir()}
    again = subprocess.run([*command, "trainer.device=auto"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert f"{run_dir} already holds a finished run" in again.stdout


@pytest.mark.slow
def test_cli_same_command_resumes_in_the_same_folder(tmp_path):
    """The real entry point: SIGTERM mid-run, then the same command finishes the run bit-for-bit."""
    command = [sys.executable, "-m", "experiments.train", f"run_root={tmp_path}", "optimizer=metaopt_lion_lion",
               "trainer.max_steps=400", "trainer.log_every=10", "trainer.eval_every=100", "trainer.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "digits" / "mlp" / "metaopt_lion_lion" / "trainer.eval_every=100,trainer.log_every=10,trainer.max_steps=400" / "seed=0"
    process = subprocess.Popen(command, cwd=REPO, env=env)
    while process.poll() is None and not any(int(r["step"]) >= 30 for r in rows_if_any(run_dir)):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 3, "the run was not stopped mid-way"
    subprocess.run(command, cwd=REPO, env=env, check=True)
    reference = tmp_path / "reference"
    subprocess.run([*command, f"run_root={reference}"], cwd=REPO, env=env, check=True)
    reference_dir = reference / run_dir.relative_to(tmp_path)
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(reference_dir))
    a = checkpoint.load(str(run_dir / "checkpoint.pt"))
    b = checkpoint.load(str(reference_dir / "checkpoint.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_gdtuo_resumes_with_its_learned_hyper_parameters(tmp_path):
    """gdtuo's checkpoint keeps alpha and the moment caches; only one hyper-gradient is lost,
    so the resumed run stays close to the uninterrupted one without matching it bit for bit."""
    cfg = compose_train(*long_run("optimizer=gdtuo_adam_adam"))
    reference = train(cfg, str(tmp_path / "reference"))
    stopped = train_until_preempted(cfg, tmp_path / "resumed")
    assert 20 <= stopped.summary["step"] < 300, "the run was not stopped mid-way"
    resumed = train(cfg, str(tmp_path / "resumed"))
    assert resumed.summary["status"] == "finished"
    rows, reference_rows = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "reference")
    logged_before_stop = [row for row in rows if int(row["step"]) <= stopped.summary["step"]]
    assert computed_columns(logged_before_stop) == computed_columns(reference_rows[: len(logged_before_stop)])
    assert resumed.summary["step_size"] == pytest.approx(reference.summary["step_size"], rel=0.01)
    assert resumed.summary["test/loss"] == pytest.approx(reference.summary["test/loss"], rel=0.01)
