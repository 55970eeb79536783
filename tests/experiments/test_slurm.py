"""The SLURM path. Fast: what the launcher asks for at each scale. On a real cluster (slow
tier): the smoke sweep of Fig. 1 through `make ... LAUNCHER=slurm` with the committed defaults, a
run stopped by `scontrol requeue` and by its time limit that resumes where it stopped and ends as
the uninterrupted run, a 2-task DDP job through the launcher against one process, and
slurm/run.sbatch stopped by SIGUSR1, requeued and resumed, its log kept.

The slow tests need a cluster that answers `sinfo`; `sudo bash slurm/local-cluster/up.sh` starts a
one-node one on this machine (.ci/run does, with METAOPT_SLURM_TESTS=require, which fails rather
than skips without one). Every job runs on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hydra import compose, initialize_config_dir

from experiments import checkpoint
from experiments.run_folder import register_resolvers
from tests.experiments.helpers import CONF, computed_columns, read_metrics

REPO = Path(__file__).resolve().parents[2]
register_resolvers()  # the launcher configs composed below name run folders (conf/hydra/default.yaml)

# A CPU cluster: no GPU (asking for one where there is no gres is an error), one core per task.
CPU_TASK = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4", "trainer.device=cpu", "trainer.progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("overrides, asked", [
    (["experiment=fig1", "scale=smoke"], (None, 1, 2)),
    (["experiment=fig1", "scale=mini"], (None, 1, 4)),
    (["experiment=fig4"], (1, 10, 64)),  # full
    ([], (1, 10, 64)),  # a single run, outside an experiment: full
])
def test_launcher_resources_follow_the_scale(overrides, asked):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == asked
    assert launcher.additional_parameters["open-mode"] == "append"
    assert any(line.startswith("trap ") and line.endswith(" USR1 USR2") for line in launcher.setup)


@pytest.fixture(scope="module")
def cluster():
    """Skip (or fail, with METAOPT_SLURM_TESTS=require) unless a SLURM cluster has a usable node."""
    states = ""
    if shutil.which("sinfo"):
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"idle|mix|alloc", states):
        message = ("no SLURM cluster answers `sinfo` with a usable node: start the one-node test cluster with "
                   "`sudo bash slurm/local-cluster/up.sh` (stop it with slurm/local-cluster/down.sh)")
        if os.environ.get("METAOPT_SLURM_TESTS") == "require":
            pytest.fail(message)
        pytest.skip(message)


def sweep(run_root: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """`python -m experiments.train -m` of one run through the SLURM launcher, in the background."""
    command = [sys.executable, "-m", "experiments.train", "-m", f"run_root={run_root}", *CPU_TASK, *overrides]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the sweep did not end within {timeout} s:\n{log.read_text()[-3000:]}") from None
    assert returncode == 0, log.read_text()[-3000:]


def run_folder(run_root: Path) -> Path:
    [meta] = [p for p in run_root.glob("**/meta.json") if ".submitit" not in p.parts]
    return meta.parent


def job_folders(run_root: Path) -> list[Path]:
    """submitit's folders of a sweep's jobs, <run_root>/.submitit/<job id>/ (an array's tasks:
    <array id>_<task>/, next to <array id>/ with the batch script)."""
    folder = run_root / ".submitit"
    return [p for p in folder.iterdir() if p.is_dir()] if folder.exists() else []


def job_folder(run_root: Path) -> Path:
    """submitit's folder of the sweep's one job."""
    [folder] = job_folders(run_root)
    return folder


def meta_when(run_root: Path, accept, timeout: float, log: Path, process: subprocess.Popen | None = None) -> dict:
    """meta.json of the one run under run_root once `accept(meta)` holds (while `process`, the
    sweep, if given, still waits for its job)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        paths = [p for p in run_root.glob("**/meta.json") if ".submitit" not in p.parts]
        if paths:
            try:
                meta = json.loads(paths[0].read_text())
            except json.JSONDecodeError:  # caught mid-write
                meta = None
            if meta is not None and accept(meta):
                return meta
        assert process is None or process.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else "(no log yet)"
    raise AssertionError(f"meta.json did not reach the state within {timeout} s:\n{tail}")


def logged(run_root: Path, step: int, timeout: float, log: Path) -> None:
    """Wait until the run's metrics.csv has a row at `step` or later."""
    deadline = time.time() + timeout
    while not any(int(row["step"]) >= step for row in read_metrics(run_folder(run_root)) if row["step"]):
        assert time.time() < deadline, f"step {step} not logged within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.timeout(1800)
@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_make_fig1_smoke_on_slurm_with_the_committed_defaults(tmp_path):
    """`make fig1 SCALE=smoke LAUNCHER=slurm` as a user types it: one job array, every run
    finished, runs.csv complete, the figure drawn. The smoke scale asks for no GPU."""
    if (REPO / "conf" / "local" / "slurm.yaml").exists():
        pytest.fail("conf/local/slurm.yaml exists: this test checks the committed defaults, move it aside")
    runs, results = tmp_path / "runs", tmp_path / "results"
    started = time.time()
    make = subprocess.run(["make", "fig1", "SCALE=smoke", "LAUNCHER=slurm", f"ARGS=run_root={runs}",
                           f"RESULTS={results}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1700)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    print(f"make fig1 SCALE=smoke LAUNCHER=slurm: {time.time() - started:.0f} s")

    with open(results / "fig1" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    with open(results / "fig1" / "summary.csv") as f:
        settings = list(csv.DictReader(f))
    assert len({row["run"] for row in rows}) == len(settings) > 0
    assert {row["status"] for row in rows} == {"finished"}
    assert {row["step"] for row in rows} == {"0", "2", "4"}  # smoke: 4 steps, logged every 2
    assert len(rows) == 3 * len(settings)
    assert (results / "fig1" / "fig1.png").stat().st_size > 10_000

    # one array, a task per run, each on one CPU without a GPU
    [array] = {p.name.split("_")[0] for p in job_folders(runs)}
    tasks = subprocess.run(["sacct", "-X", "-n", "-P", "-j", array, "-o", "JobID,State,ReqTRES"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(tasks) == len(settings)
    for task in tasks:
        _, state, tres = task.split("|")
        assert state == "COMPLETED" and "cpu=1," in tres and "gpu" not in tres, task


@pytest.mark.timeout(2700)
@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_requeue_and_time_limit_resume_where_the_run_stopped(tmp_path):
    """A run longer than its 2-minute time limit: `scontrol requeue` (SIGTERM) in its first job,
    then SIGUSR2 before the limit of the next (submitit requeues). Each stop checkpoints the step
    it happened at, between periodic checkpoints; each requeued job resumes there; the run ends
    with every metric equal to an uninterrupted run's.

    150,000 steps (about 1 ms each) outlast the second job's time on any machine (SIGUSR2 comes
    45 to 75 s after its start); once it has come, the pending job's limit is raised to 30
    minutes so that the third job finishes the run however slow this machine is."""
    train = ["trainer.max_steps=150000", "trainer.log_every=1000", "trainer.eval_every=25000",
             "trainer.checkpoint_every=20000"]
    log = tmp_path / "sweep.log"
    process = sweep(tmp_path / "runs", *train, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=45",
                    log=log)
    try:
        meta_when(tmp_path / "runs", lambda m: m["status"] == "running", 300, log, process)
        logged(tmp_path / "runs", 5000, 120, log)
        job = job_folder(tmp_path / "runs").name
        subprocess.run(["scontrol", "requeue", job], check=True)
        requeued = time.time()
        stopped = meta_when(tmp_path / "runs", lambda m: m["status"] == "preempted", 60, log, process)
        assert stopped["signal"] == "SIGTERM" and stopped["step"] % 20000 != 0, stopped

        # the uninterrupted run, on this machine while the job waits for its requeue
        reference = subprocess.Popen([sys.executable, "-m", "experiments.train", f"run_root={tmp_path / 'reference'}",
                                      "trainer.device=cpu", "trainer.progress_bar=false", *train],
                                     cwd=REPO, env=ENV, stdout=(tmp_path / "reference.log").open("w"),
                                     stderr=subprocess.STDOUT)
        resumed = meta_when(tmp_path / "runs", lambda m: m["status"] == "running" and m["resumed_at_step"], 600,
                            log, process)
        print(f"scontrol requeue: stopped at step {stopped['step']}, resumed at step {resumed['resumed_at_step']} "
              f"{time.time() - requeued:.0f} s later")
        assert resumed["resumed_at_step"] == stopped["step"]
        timed_out = meta_when(tmp_path / "runs", lambda m: m["status"] == "preempted", 300, log, process)
        assert timed_out["signal"] == "SIGUSR2" and timed_out["step"] % 20000 != 0, timed_out
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], check=True)
        assert reference.wait(timeout=1200) == 0, (tmp_path / "reference.log").read_text()[-3000:]
        finish(process, log, timeout=1500)
    finally:  # nothing left queued, whatever failed
        for folder in job_folders(tmp_path / "runs"):
            subprocess.run(["scancel", folder.name], check=False)

    # The job's own log, appended across its requeues: every stop and every resume, in order.
    output = next(job_folder(tmp_path / "runs").glob("*_log.out")).read_text()
    events = re.findall(r"(SIGTERM|SIGUSR2): checkpointed at step (\d+)|resuming at step (\d+)", output)
    print("stops and resumes:", events)
    stops = [(signal_name, int(step)) for signal_name, step, _ in events if signal_name]
    resumes = [int(step) for signal_name, _, step in events if not signal_name]
    assert stops == [("SIGTERM", stopped["step"]), ("SIGUSR2", timed_out["step"])], events
    assert resumes == [stopped["step"], timed_out["step"]], "a requeued job did not resume where its predecessor stopped"
    assert "Requeued job" in output  # submitit's log line: the time limit's requeue was submitit's

    meta = json.loads((run_folder(tmp_path / "runs") / "meta.json").read_text())
    assert (meta["status"], meta["step"], meta["resumed_at_step"]) == ("finished", 150000, timed_out["step"])
    reference_folder = run_folder(tmp_path / "reference")
    assert computed_columns(read_metrics(run_folder(tmp_path / "runs"))) == computed_columns(read_metrics(reference_folder))


@pytest.mark.timeout(900)
@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_two_task_ddp_job_through_the_launcher_matches_one_process(tmp_path):
    """tasks_per_node=2: two ranks from SLURM's variables (gloo, CPU), each with half of every
    batch; the same run as one process up to the order of floating-point sums."""
    train = ["optimizer=metaopt_adamw_adam", "optimizer.alpha0=1e-3", "trainer.max_steps=200", "trainer.log_every=20",
             "trainer.eval_every=100"]
    log = tmp_path / "sweep.log"
    process = sweep(tmp_path / "runs", *train, "hydra.launcher.tasks_per_node=2", log=log)
    single = subprocess.run([sys.executable, "-m", "experiments.train", f"run_root={tmp_path / 'single'}",
                             "trainer.device=cpu", "trainer.progress_bar=false", *train],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    finish(process, log, timeout=600)

    ddp_folder, single_folder = run_folder(tmp_path / "runs"), run_folder(tmp_path / "single")
    assert json.loads((ddp_folder / "meta.json").read_text())["world_size"] == 2
    output = "".join(p.read_text() for p in job_folder(tmp_path / "runs").glob("*_log.out"))
    assert "2 x cpu" in output
    ddp, one = read_metrics(ddp_folder), read_metrics(single_folder)
    assert [row["step"] for row in ddp] == [row["step"] for row in one]
    assert float(one[-1]["train/loss"]) < 0.5 * float(one[1]["train/loss"])  # it learns: the weights move
    for a, b in zip(ddp, one):
        for key in ("train/loss", "train/acc", "test/loss", "test/acc", "step_size"):
            if b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    a, b = (checkpoint.load(str(folder / "checkpoint.pt"))["model"] for folder in (ddp_folder, single_folder))
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
@pytest.mark.timeout(900)
def test_run_sbatch_passes_usr1_on_requeues_itself_and_keeps_its_log(tmp_path):
    """slurm/run.sbatch without a GPU (SBATCH_GPUS_PER_NODE=0): SIGUSR1 to its batch shell, as
    its --signal=B:USR1 would send, reaches the run through the trap and srun; the run
    checkpoints, the script requeues the job, the next job resumes at that step and appends to
    the same log."""
    run_root = tmp_path / "runs"
    log = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", "--time=10", f"--output={log}",
                          "slurm/run.sbatch", f"run_root={run_root}", "trainer.max_steps=30000", "trainer.log_every=1000",
                          "trainer.eval_every=10000", "trainer.checkpoint_every=10000", "trainer.device=cpu",
                          "trainer.progress_bar=false"],
                         cwd=REPO, env={**os.environ, "SBATCH_GPUS_PER_NODE": "0"}, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    try:
        meta_when(run_root, lambda m: m["status"] == "running", 300, log)
        logged(run_root, 2000, 120, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        stopped = meta_when(run_root, lambda m: m["status"] == "preempted", 60, log)
        assert stopped["signal"] == "SIGUSR1" and stopped["step"] % 10000 != 0
        meta = meta_when(run_root, lambda m: m["status"] == "finished", 600, log)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert meta["step"] == 30000 and meta["resumed_at_step"] == stopped["step"]
    text = log.read_text()
    assert f"job {job_id} (restart 0)" in text and f"job {job_id} (restart 1)" in text  # appended, not truncated
    assert f"SIGUSR1: checkpointed at step {stopped['step']}" in text and f"resuming at step {stopped['step']}" in text
    assert f"requeueing job {job_id}" in text

