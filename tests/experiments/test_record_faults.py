"""Faults of the record's fault round (issue 24) that no other test makes happen: each as a user or an
operator meets it (real processes, real files), with the clear refusal or the right record checked.

- a finished run whose meta.json was damaged (not only lost) is rebuilt from its final checkpoint, by
  collecting and by running the same command (before, the error told to rerun, which changed nothing);
- collect_runs.py stopped by a full disk (a real file-size limit) leaves the old runs.csv and no temporary;
- make_figures.py refuses a runs.csv in which a run was interrupted (Ctrl-C) instead of drawing it cut off,
  naming the file it read (before, its errors named results/<item>/runs.csv whatever --results said);
- `make help` lists every item of conf/experiment/.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.reproduce import ITEMS
from experiments.run_folder import manifest_path, read_run
from experiments.trainer import train
from tests.experiments.helpers import compose_train

REPOSITORY = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
TINY = ["dataset=digits", "model=mlp", "optimizer=adamw", "trainer.max_steps=4", "trainer.log_every=2",
        "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.progress_bar=false", "logger=csv"]
sys.path.insert(0, str(REPOSITORY / "scripts"))
import make_figures  # noqa: E402


@pytest.mark.parametrize("damage", ['{"status": "fini', "[]", "\udcff"])
def test_a_damaged_meta_json_of_a_finished_run_is_rebuilt_from_its_checkpoint(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    cfg = compose_train(*TINY, f"run_root={tmp_path}")
    summary = train(cfg, str(run_dir)).summary
    meta = run_dir / "meta.json"
    meta.write_bytes(damage.encode("utf-8", "surrogateescape"))
    rows = read_run(run_dir)  # what collect_runs reads
    assert rows and {row["status"] for row in rows} == {"finished"}
    assert json.loads(meta.read_text())["summary"] == summary
    meta.write_bytes(damage.encode("utf-8", "surrogateescape"))
    capsys.readouterr()
    train(cfg, str(run_dir))  # the same command again
    assert "meta.json was unreadable; rebuilt from" in capsys.readouterr().out
    assert json.loads(meta.read_text())["status"] == "finished"


def test_a_damaged_meta_json_of_an_unfinished_run_is_named_with_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    stopped = train(compose_train(*TINY, f"run_root={tmp_path}", "trainer.max_time=0"), str(run_dir))
    assert stopped.summary["status"] == "stopped"  # after its first step: not finished
    (run_dir / "meta.json").write_text("{")
    refused = r"run/meta.json cannot be read \(JSONDecodeError.*run the run's command again"
    with pytest.raises(ValueError, match=refused):
        read_run(run_dir)


def test_collect_runs_stopped_by_a_full_disk_keeps_the_old_runs_csv(tmp_path):
    """A file-size limit makes every write past 16 bytes fail as a full disk does (EFBIG for ENOSPC)."""
    out = tmp_path / "results" / "fig2"
    out.mkdir(parents=True)
    old = (REPOSITORY / "results" / "fig2" / "runs.csv").read_bytes()
    (out / "runs.csv").write_bytes(old)
    run_root = f"run_root={tmp_path / 'runs'}"  # a sweep of no runs: collect_runs writes runs.csv's header alone
    manifest = manifest_path(str(tmp_path / "runs"), "fig2", ["experiment=fig2", "scale=smoke", run_root])
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"arguments": ["experiment=fig2", "scale=smoke", run_root], "chosen": {}, "runs": []}))

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))

    done = subprocess.run([sys.executable, "scripts/collect_runs.py", "fig2", "--scale", "smoke", "--out", str(out),
                           run_root], cwd=REPOSITORY, env=ENV, capture_output=True, text=True,
                          preexec_fn=full_disk)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert (out / "runs.csv").read_bytes() == old
    assert os.listdir(out) == ["runs.csv"]  # no temporary left behind


def test_make_figures_refuses_a_run_interrupted_by_ctrl_c(tmp_path):
    text = (REPOSITORY / "results" / "fig2" / "runs.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    stopped = (rows[0]["run"], rows[0]["seed"])
    for row in rows:
        if (row["run"], row["seed"]) == stopped:
            row["status"] = "interrupted"
    (tmp_path / "fig2").mkdir()
    (tmp_path / "fig2" / "sweep.json").write_text((REPOSITORY / "results" / "fig2" / "sweep.json").read_text())
    with open(tmp_path / "fig2" / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    refused = rf"(?s){tmp_path}/fig2/runs.csv does not hold .*not finished \(interrupted\)"
    with pytest.raises(make_figures.MissingRuns, match=refused):
        make_figures.build("fig2", tmp_path)


def test_make_help_lists_every_item():
    listed = subprocess.run(["make", "-s", "help"], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    targets = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert set(ITEMS) <= targets
