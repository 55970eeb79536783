"""Run-folder integrity under real faults: kills during a resume, damaged checkpoints, two
processes on one folder, divergence between checkpoints.

Each test makes the fault happen for real (SIGKILL sent to a training subprocess, bytes flipped
in a checkpoint written by a real run, a second live process holding the folder) and checks
that nothing recorded is lost and every error names the file and the way on.
"""

import errno
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments import checkpoint
from experiments.files import LOCK_NAME, LockingUnsupported, RunFolderInUse
from experiments.trainer import train
from tests.experiments.helpers import (TINY, compose_train, computed_columns, read_metrics, read_wandb_history,
                                       rows_if_any, train_until_preempted)

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def checkpointed_run(*overrides: str) -> list[str]:
    """300 steps, a checkpoint every 100: stopped at step 150 or later, a folder holds two checkpoints."""
    return [*TINY, "optimizer=metaopt_adamw_adam", "trainer.max_steps=300", "trainer.log_every=10",
            "trainer.eval_every=50", "trainer.checkpoint_every=100", *overrides]


def cli(run_dir: Path, *overrides: str) -> list[str]:
    """`python -m experiments.train` into run_dir."""
    return [sys.executable, "-m", "experiments.train", f"hydra.run.dir={run_dir}", *overrides]


# -- metrics.csv -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_while_a_resume_rewrites_metrics_csv_loses_no_row(tmp_path):
    """A resuming run trims metrics.csv to its checkpoint; killed in the middle, the file is whole."""
    overrides = [*TINY, "optimizer=adamw", "trainer.max_steps=12000", "trainer.log_every=1", "trainer.eval_every=0",
                 "trainer.checkpoint_every=1000"]
    run_dir = tmp_path / "run"
    stopped = train_until_preempted(compose_train(*overrides), run_dir, step=8000)
    assert stopped.summary["step"] < 12000
    before = (run_dir / "metrics.csv").read_bytes()
    assert len(read_metrics(run_dir)) > 8000

    process = subprocess.Popen(cli(run_dir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    rewriting = False
    while process.poll() is None and not rewriting:
        # the rewrite has begun: a temporary copy exists, or (written in place) the file shrank
        rewriting = any(run_dir.glob("metrics.csv.*.tmp")) or (run_dir / "metrics.csv").stat().st_size < len(before)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert rewriting, "the run ended before it rewrote metrics.csv"
    assert (run_dir / "metrics.csv").read_bytes() == before

    subprocess.run(cli(run_dir, *overrides), cwd=REPO, env=ENV, check=True, capture_output=True)
    steps = [int(row["step"]) for row in read_metrics(run_dir)]
    assert steps == list(range(1, 12001))


def test_a_torn_last_row_is_dropped_and_run_again(tmp_path):
    """A SIGKILL in the middle of a row leaves half a line; the resumed run drops it with the rows after
    its checkpoint and ends with the uninterrupted run's rows."""
    cfg = compose_train(*checkpointed_run())
    train(cfg, str(tmp_path / "reference"))
    run_dir = tmp_path / "torn"
    stopped = train_until_preempted(cfg, run_dir, step=120)
    # the next row the run would have written, cut by the kill after two characters: its step reads as a
    # small number, which without the repair would stay in the file as a malformed row
    reference_lines = (tmp_path / "reference" / "metrics.csv").read_text().splitlines(keepends=True)
    next_row = next(line for line in reference_lines[1:] if int(line.split(",")[0]) > stopped.summary["step"])
    with open(run_dir / "metrics.csv", "a", newline="") as f:
        f.write(next_row[:2])
    train(cfg, str(run_dir))
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(tmp_path / "reference"))


def test_a_foreign_metrics_csv_keeps_the_checkpoint(tmp_path):
    """metrics.csv with other columns: the error says how to go on without deleting the checkpoint."""
    cfg = compose_train(*checkpointed_run())
    run_dir = tmp_path / "run"
    train_until_preempted(cfg, run_dir, step=120)
    (run_dir / "metrics.csv").write_text("")  # emptied by something else
    with pytest.raises(ValueError, match=r"The checkpoint is fine: .*move this one aside \(mv .*metrics.csv"):
        train(cfg, str(run_dir))
    os.rename(run_dir / "metrics.csv", run_dir / "metrics.csv.old")
    assert train(cfg, str(run_dir)).summary["status"] == "finished"
    assert int(read_metrics(run_dir)[0]["step"]) > 100  # the rows from the checkpoint on


# -- checkpoints -------------------------------------------------------------------------------------


def flip_bytes(path: Path, offsets: list[int]) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_resumes(tmp_path):
    cfg = compose_train(*checkpointed_run())
    train(cfg, str(tmp_path / "reference"))
    run_dir = tmp_path / "run"
    stopped = train_until_preempted(cfg, run_dir, step=150)
    path = run_dir / "checkpoint.pt"
    previous_step = checkpoint.load(str(run_dir / "checkpoint.previous.pt"))["step"]
    assert 100 <= previous_step < stopped.summary["step"] == checkpoint.load(str(path))["step"]

    # 16 bytes in the middle of the file, inside the tensors' data, as the fault injector did
    size = path.stat().st_size
    flip_bytes(path, [size // 2 + 97 * i for i in range(16)])
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        train(cfg, str(run_dir))
    message = str(error.value)
    assert f"{path} is damaged" in message and "it was not used" in message
    assert f"mv {run_dir / 'checkpoint.previous.pt'} {path}" in message and f"(step {previous_step}, verified)" in message
    assert f"rm {path} {run_dir / 'checkpoint.previous.pt'}" in message

    os.replace(run_dir / "checkpoint.previous.pt", path)  # the first choice of the message
    resumed = train(cfg, str(run_dir))
    assert resumed.summary["status"] == "finished"
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(tmp_path / "reference"))


def test_no_single_bit_flip_loads_silently(tmp_path):
    """200 single-bit flips at random places of a real checkpoint: each is refused, or (a bit of the
    zip's own bookkeeping) the state loaded is the one saved, verified by its checksum."""
    train(compose_train(*TINY, "optimizer=metaopt_adamw_adam"), str(tmp_path / "run"))
    path = tmp_path / "run" / "checkpoint.pt"
    original = path.read_bytes()
    saved_digest = checkpoint.payload_digest(checkpoint.load(str(path)))
    damaged = tmp_path / "damaged.pt"
    generator = random.Random(0)
    refused = 0
    for _ in range(200):
        data = bytearray(original)
        bit = generator.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        damaged.write_bytes(bytes(data))
        try:
            state = checkpoint.load(str(damaged))
        except checkpoint.DamagedCheckpoint as error:
            assert str(damaged) in str(error)
            refused += 1
        else:
            assert checkpoint.payload_digest(state) == saved_digest, f"bit {bit} changed the state silently"
    assert refused >= 150  # most bits are data: the check is not vacuous


def test_no_verified_previous_checkpoint_offers_to_start_over(tmp_path):
    train(compose_train(*TINY, "optimizer=adamw"), str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:1000])  # truncated copy
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"cannot be read .*No verified previous checkpoint is "
                                                          r"kept, so start the run over: rm .*checkpoint.pt"):
        train(compose_train(*TINY, "optimizer=adamw"), str(tmp_path))


def test_a_diverged_state_never_replaces_the_last_good_checkpoint(tmp_path):
    """The weights turn NaN between logged rows (log_every=100): the checkpoint due then is refused."""
    cfg = compose_train(*TINY, "optimizer=adamw", "optimizer.lr=1e30", "trainer.max_steps=40", "trainer.log_every=100",
                        "trainer.checkpoint_every=1")
    with pytest.raises(FloatingPointError, match=r"weight \S+ is not finite at step (\d+): training diverged.*the run "
                                                  r"folder keeps the last checkpoint, from before this") as error:
        train(cfg, str(tmp_path))
    diverged_at = int(str(error.value).split(" at step ")[1].split(":")[0])
    kept = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert kept["step"] == diverged_at - 1 >= 1
    assert checkpoint.first_non_finite(kept["model"]) is None and checkpoint.first_non_finite(kept["optimizer"]) is None
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "failed"


def test_a_stop_signal_after_divergence_between_logged_rows_writes_no_checkpoint(tmp_path):
    """SIGTERM once the weights are NaN but before any row shows it: the stop checkpoint is refused."""
    cfg = compose_train(*TINY, "optimizer=adamw", "optimizer.lr=1e30", "trainer.max_steps=1000000",
                        "trainer.log_every=1000000", "trainer.eval_every=0", "trainer.checkpoint_every=0")

    def sigterm_once_training():
        while not (tmp_path / "meta.json").exists():
            time.sleep(0.01)
        time.sleep(1.0)  # hundreds of steps: the weights diverged after the first few
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=sigterm_once_training, daemon=True)
    watcher.start()
    with pytest.raises(FloatingPointError, match=r"weight \S+ is not finite at step \d+: training diverged.*keeps no "
                                                  r"checkpoint \(none was due yet\)"):
        train(cfg, str(tmp_path))
    watcher.join()
    assert not (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "failed"


def test_a_step_size_that_underflows_to_zero_fails(tmp_path):
    """A far too large start shrunk by a large meta step: exp(beta) reaches exactly 0 and the weights
    stop moving; the run must not end "finished"."""
    cfg = compose_train(*TINY, "optimizer=metaopt_adamw_adam", "optimizer.alpha0=0.1", "optimizer.meta_lr=200",
                        "trainer.log_every=1")
    with pytest.raises(FloatingPointError, match="step_size is 0 at step 2: the learned step size underflowed to 0"):
        train(cfg, str(tmp_path))
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "failed"


def test_a_scheduled_step_size_of_zero_finishes(tmp_path):
    """Cosine decay plans a step size of 0 at the last step: that is no underflow."""
    result = train(compose_train(*TINY, "optimizer=adamw_cosine", "optimizer.adapter.scheduler.warmup_steps=2"),
                   str(tmp_path))
    assert result.summary["status"] == "finished" and result.summary["step_size"] == 0


# -- one process per run folder ----------------------------------------------------------------------


def test_a_second_process_on_the_folder_stops_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.files import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderInUse, match=rf"is in use by process {holder.pid} on \S+: .*kill {holder.pid}"):
            train(compose_train(*TINY), str(tmp_path))
        assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "checkpoint.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"{holder.pid} ")  # the dead process's record stays
    assert train(compose_train(*TINY), str(tmp_path)).summary["status"] == "finished"


@pytest.mark.slow
def test_the_same_command_twice_at_once_runs_once(tmp_path):
    """Two real training processes on one folder: the second exits at once naming the first, whose
    metrics.csv stays in order; after the first is SIGKILLed, the same command continues it."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "optimizer=metaopt_lion_lion", "trainer.max_steps=1000000", "trainer.log_every=10",
                 "trainer.eval_every=500", "trainer.checkpoint_every=500"]
    first = subprocess.Popen(cli(run_dir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while first.poll() is None and not any(int(row["step"]) > 500 for row in rows_if_any(run_dir)):
            time.sleep(0.01)
        second = subprocess.run(cli(run_dir, *overrides), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and f"is in use by process {first.pid}" in second.stderr
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the same command again (for one step: max_time=0) continues the killed run from its checkpoint
    third = subprocess.run(cli(run_dir, *overrides, "trainer.max_time=0"), cwd=REPO, env=ENV, capture_output=True,
                           text=True)
    assert third.returncode == 3 and "resuming at step" in third.stdout
    steps = [int(row["step"]) for row in read_metrics(run_dir)]
    assert steps == [0, *range(10, steps[-1] + 1, 10)] and steps[-1] >= 500
    assert checkpoint.load(str(run_dir / "checkpoint.pt"))["step"] % 500 == 1



# -- W&B ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_keeps_every_row_across_a_sigkill(tmp_path):
    """Killed between checkpoints and resumed, the W&B runs hold every row of metrics.csv, each under
    its training step, with the values metrics.csv has (the resumed run logs the lost rows again)."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    overrides = checkpointed_run("logger=wandb")
    process = subprocess.Popen(cli(run_dir, *overrides), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and not any(int(row["step"]) >= 150 for row in rows_if_any(run_dir)):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.load(str(run_dir / "checkpoint.pt"))["step"] < 300, "the run ended before the kill"
    subprocess.run(cli(run_dir, *overrides), cwd=REPO, env=env, check=True, capture_output=True)

    run_files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2  # the killed run and the resumed one, one W&B run id
    logged = {}
    for run_file in run_files:  # later rows (the resumed run's) win, as on W&B's charts
        logged.update({row["step"]: row for row in read_wandb_history(str(run_file)) if "step" in row})
    csv_rows = read_metrics(run_dir)
    assert sorted(logged) == [int(row["step"]) for row in csv_rows] == [0, *range(10, 301, 10)]
    for row in csv_rows:
        values = {key: float(value) for key, value in row.items() if value != ""}
        assert {key: logged[int(row["step"])][key] for key in values} == pytest.approx(values, rel=1e-12)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_that_cannot_lock_stops_the_run_naming_the_folder(tmp_path, monkeypatch, code):
    """flock fails as it does on NFS mounted with nolock: the run stops before any work, naming the fix."""
    def flock_unsupported(descriptor, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock_unsupported)
    with pytest.raises(LockingUnsupported, match=rf"cannot lock {tmp_path}/run.lock: .*run_root="):
        train(compose_train(*TINY), str(tmp_path))
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "checkpoint.pt").exists()
