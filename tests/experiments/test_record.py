"""The reproduction's record (issue 24): a run's identity is its whole configuration and its code,
and nothing recorded is torn, mixed with another sweep's, or written outside run_root.

Each test makes the fault happen as a user or an operator would (real training processes, real
signals, a real sweep, a real copy of the code changed on disk, files deleted or planted under a
live run) and checks the clear refusal or the right record.
"""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import checkpoint
from experiments.run_folder import read_run
from experiments.reproduce import compose_experiment
from experiments.schema import tuning_score
from experiments.sweeps import expected_runs
from experiments.trainer import train
from tests.experiments.helpers import TINY, compose_train, read_wandb_records, rows_if_any

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
sys.path.insert(0, str(REPO / "scripts"))
import collect_runs  # noqa: E402
import make_figures  # noqa: E402

# a run that goes on until stopped, logging every 10 steps, checkpointing only when stopped
ENDLESS = [*TINY, "optimizer=adamw", "trainer.max_steps=1000000", "trainer.log_every=10", "trainer.eval_every=0",
           "trainer.checkpoint_every=0"]


def cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"hydra.run.dir={run_dir}", *overrides]


def start(run_dir: Path, *overrides: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    """The run in a process of its own, with Ctrl-C's default action (as in a terminal, also where the
    tests themselves run in the background, which ignores SIGINT)."""
    return subprocess.Popen(cli(run_dir, *overrides), cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    while process.poll() is None and not any(int(row["step"]) >= step for row in rows_if_any(run_dir)):
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it reached step %d: %s" % (step, process.communicate())


def stopped_after_one_step(run_dir: Path, *overrides: str, cwd: Path = REPO, env: dict | None = None) -> None:
    """A run stopped by its max_time after its first step (exit status 3), checkpointed there."""
    done = subprocess.run(cli(run_dir, *overrides, "trainer.max_time=0"), cwd=cwd, env=env or ENV,
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]


# -- a run's identity ----------------------------------------------------------------------------------


def test_a_changed_setting_outside_the_folder_name_is_refused_naming_the_key(tmp_path):
    """The same folder, a trainer setting changed (as a changed default in conf/ would): refused, with the
    key and both values; before, only dataset, model, optimizer and seed were compared."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "optimizer=adamw", "trainer.max_steps=300"]
    stopped_after_one_step(run_dir, *overrides)
    before = (run_dir / "metrics.csv").read_bytes()
    again = subprocess.run(cli(run_dir, *overrides, "trainer.grad_clip=1.0"), cwd=REPO, env=ENV, capture_output=True,
                           text=True)
    assert again.returncode != 0
    assert "holds a run of another configuration" in again.stderr
    assert "trainer.grad_clip: None -> 1.0" in again.stderr
    assert (run_dir / "metrics.csv").read_bytes() == before
    assert json.loads((run_dir / "meta.json").read_text())["config_sha256"] == \
        checkpoint.load(str(run_dir / "checkpoint.pt"))["config_sha256"]


@pytest.mark.timeout(900)
def test_resuming_across_a_code_change_is_refused_unless_asked_and_then_recorded(tmp_path):
    """A copy of the code runs a run, stopped; a line of the copy's trainer changes; the same command is
    refused; with trainer.resume_across_code_change=true it continues, and meta.json names the step."""
    code = tmp_path / "code"
    for package in ("metaopt", "experiments", "conf"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**ENV, "PYTHONPATH": str(code)}
    run_dir = tmp_path / "run"
    overrides = [*TINY, "optimizer=adamw", "trainer.max_steps=6"]
    stopped_after_one_step(run_dir, *overrides, cwd=code, env=env)
    first_code = json.loads((run_dir / "meta.json").read_text())["code_sha256"]

    trainer = code / "experiments" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n# a change of the code between two jobs of a run\n")
    refused = subprocess.run(cli(run_dir, *overrides), cwd=code, env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "was written by other code" in refused.stderr and "trainer.resume_across_code_change=true" in refused.stderr
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "stopped"

    resumed = subprocess.run(cli(run_dir, *overrides, "trainer.resume_across_code_change=true"), cwd=code, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["code_sha256"] != first_code
    assert meta["code_changes"] == [{"step": 1, "from": first_code, "to": meta["code_sha256"]}]
    assert checkpoint.load(str(run_dir / "checkpoint.pt"))["code_changes"] == meta["code_changes"]


def test_collect_runs_takes_only_the_folders_of_its_own_sweep(tmp_path):
    """Fig. 2 at smoke size, swept twice: as is, and with ARGS=trainer.max_steps=6. Each collect takes its
    own sweep's folders (before, both took whichever folder sorted last)."""
    run_root = f"run_root={tmp_path / 'runs'}"
    for extra in ([], ["trainer.max_steps=6"]):
        sweep = subprocess.run([sys.executable, "-m", "experiments.train", "experiment=fig2", "scale=smoke", run_root,
                                *extra], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
    # each sweep wrote down its runs and their folders: its manifest
    fig2 = compose_experiment("fig2", "smoke")
    manifests = sorted((tmp_path / "runs" / "fig2").glob("sweep-*.json"))
    assert len(manifests) == 2
    for manifest in manifests:
        record = json.loads(manifest.read_text())
        assert record["complete"] and len(record["runs"]) == 5
        # each run's arm, as the figure names its curve
        assert [entry["arm"] for entry in record["runs"]] == [run.arm for run in expected_runs(fig2)]
        assert all(entry["launched"] and (tmp_path / "runs" / entry["folder"] / "metrics.csv").exists()
                   and ("trainer.max_steps=6" in entry["folder"]) == ("trainer.max_steps=6" in record["arguments"])
                   for entry in record["runs"])
    for extra, last_step in (([], 4), (["trainer.max_steps=6"], 6)):
        out = tmp_path / f"results{last_step}" / "fig2"
        count, missing = collect_runs.collect("fig2", "smoke", out, [run_root, *extra])
        assert missing == [] and count > 0
        with open(out / "runs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {int(row["step"]) for row in rows} <= set(range(last_step + 1))
        assert max(int(row["step"]) for row in rows) == last_step
        assert all(("trainer.max_steps=6" in row["run"]) == (last_step == 6) for row in rows)

    # a sweep never run (another override) has no manifest: refused, naming the file
    with pytest.raises(FileNotFoundError, match="sweep-.*json does not exist"):
        collect_runs.collect("fig2", "smoke", tmp_path / "other" / "fig2", [run_root, "trainer.log_every=1"])
    # a folder whose recorded configuration is not this sweep's (conf/ changed since): missing, naming the key
    config = tmp_path / "runs" / json.loads(manifests[0].read_text())["runs"][0]["folder"] / "config.yaml"
    config.write_text(config.read_text().replace("log_every: 2", "log_every: 1"))
    count, missing = collect_runs.collect("fig2", "smoke", tmp_path / "other" / "fig2",
                                          [run_root, *json.loads(manifests[0].read_text())["arguments"][3:]])
    assert len(missing) == 1 and "holds another configuration" in missing[0] and "trainer.log_every: 1 -> 2" in missing[0]


# -- nothing mixed, torn or outside run_root -----------------------------------------------------------


def test_deleting_a_live_runs_folder_or_its_lock_gives_it_no_second_writer(tmp_path):
    """The messages say "delete the folder to run it again": done while the run lives, the same command
    must still stop (before, it ran as a second writer)."""
    run_dir = tmp_path / "run"
    first = start(run_dir, *ENDLESS)
    try:
        wait_for_step(first, run_dir, 20)
        (run_dir / "run.lock").unlink()
        second = subprocess.run(cli(run_dir, *ENDLESS, "trainer.max_time=0"), cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode not in (0, 3) and f"is in use by process {first.pid} " in second.stderr
        shutil.rmtree(run_dir)
        third = subprocess.run(cli(run_dir, *ENDLESS, "trainer.max_time=0"), cwd=REPO, env=ENV, capture_output=True,
                               text=True, timeout=300)
        assert third.returncode not in (0, 3) and f"is in use by process {first.pid} " in third.stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # once the first is gone, the folder is free again
    assert subprocess.run(cli(run_dir, *ENDLESS, "trainer.max_time=0"), cwd=REPO, env=ENV,
                          capture_output=True).returncode == 3


def test_a_symbolic_link_planted_as_run_lock_is_not_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("a file the run must not touch\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").symlink_to(victim)
    with pytest.raises(OSError, match=r"run.lock is a symbolic link, which a run never follows"):
        train(compose_train(*TINY, "optimizer=adamw"), str(run_dir))
    assert victim.read_text() == "a file the run must not touch\n"
    assert not (run_dir / "metrics.csv").exists()


def test_only_the_runs_own_temporaries_are_removed(tmp_path):
    ours = ["checkpoint.pt.metaopt-4242.tmp", "meta.json.metaopt-4243.tmp", "metrics.csv.metaopt-4244.tmp"]
    users = ["notes.1.tmp", "draft.4242.tmp", "notes.tmp"]
    for name in ours + users:
        (tmp_path / name).write_text("partial")
    train(compose_train(*TINY, "optimizer=adamw"), str(tmp_path))
    assert not [name for name in ours if (tmp_path / name).exists()]
    assert all((tmp_path / name).read_text() == "partial" for name in users)


def test_an_override_with_dotdot_is_refused_before_any_folder_is_made(tmp_path):
    """logger.wandb.tags=[../../x] named the run folder: before, the run wrote its checkpoint and metrics
    outside run_root."""
    run_root = tmp_path / "root" / "runs"
    escape = tmp_path / "escaped"
    depth = "/".join([".."] * (len(run_root.parts) + 8))
    command = [sys.executable, "-m", "experiments.train", f"run_root={run_root}", *TINY, "logger=wandb",
               "logger.wandb.mode=disabled", f"logger.wandb.tags=[{depth}{escape}]"]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0
    assert "the run folder's name would leave run_root" in result.stderr and "logger.wandb.tags=" in result.stderr
    assert not (tmp_path / "root").exists() and not escape.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_lost_meta_json_is_rebuilt_from_the_final_checkpoint(tmp_path):
    """Before, a finished run without meta.json stayed unusable: reruns said it was finished, collecting
    said it had no folder."""
    run_dir = tmp_path / "run"
    summary = train(compose_train(*TINY, "optimizer=adamw"), str(run_dir)).summary
    (run_dir / "meta.json").unlink()
    rows = read_run(run_dir)  # what collect_runs reads
    assert rows and {row["status"] for row in rows} == {"finished"}
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and meta["summary"] == summary
    (run_dir / "meta.json").unlink()
    again = subprocess.run(cli(run_dir, *TINY, "optimizer=adamw"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "meta.json was missing; rebuilt from" in again.stdout
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


def test_make_figures_refuses_a_torn_or_incomplete_runs_csv(tmp_path):
    results = tmp_path / "results"
    (results / "fig2").mkdir(parents=True)
    shutil.copy(REPO / "results" / "fig2" / "sweep.json", results / "fig2" / "sweep.json")
    text = (REPO / "results" / "fig2" / "runs.csv").read_text()
    (results / "fig2" / "runs.csv").write_text(text[: len(text) - 7])  # cut inside its last row
    with pytest.raises(ValueError, match=r"fig2/runs.csv is torn: its last line has no line break"):
        make_figures.build("fig2", results)
    header, *lines = text.splitlines(keepends=True)
    short = io.StringIO()
    csv.writer(short, lineterminator="\n").writerow(next(csv.reader([lines[3]]))[:10])
    lines[3] = short.getvalue()  # a row that lost its last columns
    (results / "fig2" / "runs.csv").write_text(header + "".join(lines))
    with pytest.raises(ValueError, match=r"fig2/runs.csv, line 5: \d+ columns expected, the row has 10"):
        make_figures.build("fig2", results)
    bad = text.splitlines(keepends=True)
    fields = next(csv.reader([bad[2]]))
    fields[header.rstrip("\n").split(",").index("train/loss")] = "0.2x"
    short = io.StringIO()
    csv.writer(short, lineterminator="\n").writerow(fields)
    (results / "fig2" / "runs.csv").write_text(header + short.getvalue() + "".join(bad[3:]))
    with pytest.raises(ValueError, match=r"fig2/runs.csv, line 2: train/loss is '0.2x', not a number"):
        make_figures.build("fig2", results)
    rows = list(csv.DictReader(io.StringIO(text)))
    with open(results / "fig2" / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in rows[0] if c != "train/loss"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"has no column train/loss, which the figure draws"):
        make_figures.build("fig2", results)


# -- signals -------------------------------------------------------------------------------------------


def test_ctrl_c_records_an_interrupted_run_not_a_failed_one(tmp_path):
    """SIGINT (Ctrl-C) was recorded "failed", like a diverged run, and drawn cut off."""
    run_dir = tmp_path / "run"
    process = start(run_dir, *ENDLESS)
    wait_for_step(process, run_dir, 20)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "recorded as interrupted" in stderr
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "interrupted"
    rows = read_run(run_dir)
    assert tuning_score(rows, "train/loss", "min") is None  # not over: no tuning choice is made from it


def test_sighup_checkpoints_and_records_the_run_as_preempted(tmp_path):
    """A closed terminal or ssh session: before, the run died without its checkpoint, meta.json "running"."""
    run_dir = tmp_path / "run"
    process = start(run_dir, *ENDLESS)
    wait_for_step(process, run_dir, 20)
    process.send_signal(signal.SIGHUP)
    process.communicate(timeout=120)
    assert process.returncode == 3
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "preempted" and meta["signal"] == "SIGHUP"
    saved = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert saved["step"] == meta["step"] >= 20 and not saved["finished"]


def descendants(pid: int) -> list:
    """The live processes below pid, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@pytest.mark.timeout(900)
def test_sigterm_to_a_sweep_reaches_its_runs(tmp_path):
    """`timeout` sends SIGTERM to the sweep's process alone: before, its runs (the local launcher's
    processes) went on training after it died."""
    run_root = tmp_path / "runs"
    # a file, not a pipe: runs left alive would hold a pipe open, and reading it would wait for them
    log = open(tmp_path / "sweep.log", "w")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "experiment=fig2", "scale=smoke", "hydra/launcher=local",
         f"run_root={run_root}", "trainer.max_steps=1000000", "trainer.log_every=10", "trainer.eval_every=0",
         "trainer.checkpoint_every=0"], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    runs = []
    try:
        deadline = time.monotonic() + 600
        while sweep.poll() is None and time.monotonic() < deadline:
            folders = [path.parent for path in run_root.glob("fig2/**/metrics.csv") if len(rows_if_any(path.parent)) > 2]
            if len(folders) == 4:  # smoke: a batch of 4 runs at once
                break
            time.sleep(0.5)
        assert sweep.poll() is None and len(folders) == 4, (tmp_path / "sweep.log").read_text()[-3000:]
        runs = descendants(sweep.pid)
        sweep.send_signal(signal.SIGTERM)
        sweep.wait(timeout=600)
        output = (tmp_path / "sweep.log").read_text()
        assert sweep.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "SIGTERM: passed on to the sweep's" in output
        assert runs and _live(runs) == []
        for folder in folders:
            meta = json.loads((folder / "meta.json").read_text())
            assert meta["status"] == "preempted" and meta["signal"] == "SIGTERM"
            assert checkpoint.load(str(folder / "checkpoint.pt"))["step"] == meta["step"]
    finally:
        log.close()
        if sweep.poll() is None:
            sweep.kill()
        for pid in _live(runs):  # left alive (the fault): killed, if the PID is still one of this test's
            try:
                if str(tmp_path) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _live(pids: list) -> list:
    live = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                live.append(pid)
        except OSError:
            pass
    return live


# -- what users asked for ------------------------------------------------------------------------------


def test_wandb_group_job_type_and_notes_reach_the_wandb_run(tmp_path, offline_wandb):
    """logger.wandb.group / job_type / notes: before, refused as settings nothing reads."""
    train(compose_train(*TINY, "optimizer=adamw", "logger=wandb", "logger.wandb.group=fig2-smoke",
                        "logger.wandb.job_type=sweep-run", "logger.wandb.notes=a note"), str(tmp_path / "run"))
    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    (record, *_) = read_wandb_records(run_file, "run")
    assert (record.run.run_group, record.run.job_type, record.run.notes) == ("fig2-smoke", "sweep-run", "a note")


def test_a_folder_reached_through_a_link_and_then_directly_stays_one_wandb_run(tmp_path, offline_wandb):
    real = tmp_path / "real" / "run"
    real.parent.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    overrides = [*TINY, "optimizer=adamw", "logger=wandb", "trainer.max_steps=6"]
    assert train(compose_train(*overrides, "trainer.max_time=0"), str(tmp_path / "link" / "run")).summary["status"] == "stopped"
    assert train(compose_train(*overrides), str(real)).summary["status"] == "finished"
    # offline-run-<date>_<time>-<run id>[-<n>: W&B's suffix for a second folder of the same name]
    ids = {path.name.split("-")[3] for path in offline_wandb.glob("wandb/offline-run-*")}
    assert len(list(offline_wandb.glob("wandb/offline-run-*"))) == 2 and len(ids) == 1


def test_an_unreadable_wandb_json_is_named_with_the_fix(tmp_path, offline_wandb):
    overrides = [*TINY, "optimizer=adamw", "logger=wandb", "trainer.max_steps=6"]
    train(compose_train(*overrides, "trainer.max_time=0"), str(tmp_path / "run"))
    (tmp_path / "run" / "wandb.json").write_text('{"last_st')
    with pytest.raises(ValueError, match=r"run/wandb.json cannot be read \(JSONDecodeError.*rm .*wandb.json"):
        train(compose_train(*overrides), str(tmp_path / "run"))


def test_a_run_started_with_nohup_ignores_sighup(tmp_path):
    """nohup: SIGHUP ignored from the start stays ignored, the run goes on to its end."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(["nohup", *cli(run_dir, *TINY, "optimizer=adamw", "trainer.max_steps=30000",
                                              "trainer.log_every=10", "trainer.eval_every=0")],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(process, run_dir, 20)
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=300) == 0
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


def test_a_refused_value_leaves_no_folder_behind(tmp_path):
    """Before, a command refused by the validation left Hydra's run folder (.hydra/, train.log) in run_root."""
    run_root = tmp_path / "runs"
    run_root.mkdir()
    result = subprocess.run([sys.executable, "-m", "experiments.train", f"run_root={run_root}", *TINY,
                             "trainer.max_steps=0"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "trainer.max_steps=0 is not allowed" in result.stderr
    assert list(run_root.iterdir()) == []


def test_a_seed_drawn_from_the_clock_is_refused_before_any_folder(tmp_path):
    """seed=${oc.decode:${now:%S}} passed the checks, then the folder said seed=29 while the run drew another."""
    run_root = tmp_path / "runs"
    run_root.mkdir()
    result = subprocess.run([sys.executable, "-m", "experiments.train", f"run_root={run_root}", *TINY,
                             "seed='${oc.decode:${now:%S}}'"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "seed='${oc.decode:${now:%S}}' is not allowed: a value drawn from the clock" \
        in result.stderr
    assert list(run_root.iterdir()) == []


def test_a_run_folder_locked_from_another_host_stays_locked_after_its_folder_is_deleted(tmp_path):
    """Another host's run (on a shared run_root) is seen through its flocks alone: here a process holding
    the run_root/.locks file of the folder, as that host's run does, after the folder was deleted."""
    run_root = tmp_path / "runs"
    run_dir = run_root / "digits" / "run"
    train(compose_train(*TINY, "optimizer=adamw", f"run_root={run_root}", "trainer.max_time=0"), str(run_dir))
    (lock,) = (run_root / ".locks").glob("*.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(d, fcntl.LOCK_EX)\nos.ftruncate(d, 0)\nos.write(d, b'4242 otherhost\\n')\n"
         "print('locked', flush=True)\ntime.sleep(600)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        shutil.rmtree(run_dir)
        with pytest.raises(RuntimeError, match=r"is in use by process 4242 on otherhost"):
            train(compose_train(*TINY, "optimizer=adamw", f"run_root={run_root}"), str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert train(compose_train(*TINY, "optimizer=adamw", f"run_root={run_root}"), str(run_dir)).summary["status"] \
        == "finished"
