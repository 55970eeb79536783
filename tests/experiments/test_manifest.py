"""collect_runs takes a sweep's runs from its manifest (the grids sweeper writes it; issue 24): the runs,
their arms and folders, and the settings its tuning chose; a sweep without a readable manifest is
refused, naming the file and the fix. It writes them down beside runs.csv (sweep.json), and make_figures
draws the runs and the chosen settings that sweep.json lists, deriving none of them again.

One real Fig. 2 sweep at smoke size (5 runs, about 10 s); each test rewrites its manifest as a
different sweep's would be and checks what is collected.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.reproduce import compose_experiment
from experiments.sweeps import expected_runs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import collect_runs  # noqa: E402
import make_figures  # noqa: E402


@pytest.fixture(scope="module")
def fig2_sweep(tmp_path_factory):
    """(run_root override, manifest path, its record) of a finished `make fig2 SCALE=smoke`."""
    runs = tmp_path_factory.mktemp("manifest") / "runs"
    sweep = subprocess.run([sys.executable, "-m", "experiments.train", "experiment=fig2", "scale=smoke",
                            f"run_root={runs}"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (manifest,) = (runs / "fig2").glob("sweep-*.json")
    return f"run_root={runs}", manifest, json.loads(manifest.read_text())


@pytest.fixture
def sweep(fig2_sweep):
    """The sweep, its manifest restored after the test rewrites it."""
    yield fig2_sweep
    fig2_sweep[1].write_text(json.dumps(fig2_sweep[2]))


def collected_runs(out: Path) -> list[str]:
    """The run folders of runs.csv, in order, once each."""
    with open(out / "runs.csv", newline="") as f:
        return list(dict.fromkeys(row["run"] for row in csv.DictReader(f)))


def folders(entries: list[dict]) -> list[str]:
    return [entry["folder"].split("/", 1)[1] for entry in entries]  # relative to run_root/fig2


def test_collect_takes_exactly_the_runs_the_manifest_names(sweep, tmp_path):
    run_root, manifest, record = sweep
    assert len(expected_runs(compose_experiment("fig2", "smoke"))) == len(record["runs"]) == 5
    kept = [record["runs"][3], record["runs"][1]]  # fewer runs than the config derives, in another order
    manifest.write_text(json.dumps({**record, "runs": kept}))
    count, missing = collect_runs.collect("fig2", "smoke", tmp_path / "fig2", [run_root])
    assert missing == [] and count > 0
    assert collected_runs(tmp_path / "fig2") == folders(kept)
    with open(tmp_path / "fig2" / "runs.csv", newline="") as f:
        assert {row["arm"] for row in csv.DictReader(f)} == {entry["arm"] for entry in kept}
    # the figure is drawn from the runs the manifest names, which are fewer than the config derives
    make_figures.build("fig2", tmp_path)
    with open(tmp_path / "fig2" / "summary.csv", newline="") as f:
        assert [row["arm"] for row in csv.DictReader(f)] == [entry["arm"] for entry in kept]


def test_collect_takes_a_tuned_grids_later_runs_of_the_chosen_setting_only(sweep, tmp_path):
    run_root, manifest, record = sweep
    runs = [dict(entry) for entry in record["runs"]]
    for entry in runs[3:]:  # as if the last two were the later runs of two settings of the tuned grid
        entry["phase"] = "later"
    chosen = {"alpha0": runs[4]["setting"]}
    manifest.write_text(json.dumps({**record, "runs": runs, "chosen": chosen}))
    collect_runs.collect("fig2", "smoke", tmp_path / "chosen", [run_root])
    assert collected_runs(tmp_path / "chosen") == folders(runs[:3] + runs[4:])
    written = json.loads((tmp_path / "chosen" / "sweep.json").read_text())
    assert [entry["phase"] for entry in written["runs"]] == ["first"] * 3 + ["later"]
    own = [o for o in runs[4]["overrides"] if o not in record["arguments"]]
    assert written["runs"][3]["overrides"] == own and written["scale"] == "smoke"
    assert written["chosen"] == {runs[4]["arm"]: " ".join(sorted(o for o in own if not o.startswith("seed=")))}
    # before the tuning chose (no chosen setting recorded yet), no later run is expected
    manifest.write_text(json.dumps({**record, "runs": runs, "chosen": {}}))
    count, missing = collect_runs.collect("fig2", "smoke", tmp_path / "tuning", [run_root])
    assert missing == [] and collected_runs(tmp_path / "tuning") == folders(runs[:3])


def test_a_run_the_manifest_names_without_a_folder_yet_is_reported_missing(sweep, tmp_path):
    run_root, manifest, record = sweep
    runs = [dict(entry) for entry in record["runs"]]
    runs[2].update(folder=None, launched=False)
    manifest.write_text(json.dumps({**record, "runs": runs}))
    count, missing = collect_runs.collect("fig2", "smoke", tmp_path / "fig2", [run_root])
    own = sorted(o for o in runs[2]["overrides"] if o not in record["arguments"] and not o.startswith("seed="))
    assert missing == [" ".join(own) + " seed=0"]
    assert collected_runs(tmp_path / "fig2") == folders(runs[:2] + runs[3:])


def test_a_sweep_without_its_manifest_is_refused_naming_the_file_and_the_command(sweep, tmp_path):
    run_root, manifest, _ = sweep
    # the same sweep with another override is another sweep: it has no manifest of its own
    with pytest.raises(FileNotFoundError) as refused:
        collect_runs.collect("fig2", "smoke", tmp_path / "fig2", [run_root, "trainer.log_every=1"])
    message = str(refused.value)
    assert str(manifest.parent / "sweep-") in message and str(manifest) not in message
    assert f"make fig2 SCALE=smoke ARGS='{run_root} trainer.log_every=1'" in message
    assert not (tmp_path / "fig2" / "runs.csv").exists()


@pytest.mark.parametrize("damage", ["torn", "not a manifest"])
def test_a_torn_or_foreign_manifest_is_refused_naming_the_file(sweep, tmp_path, damage):
    run_root, manifest, record = sweep
    text = json.dumps(record)
    manifest.write_text(text[: len(text) // 2] if damage == "torn" else json.dumps({"runs": record["runs"]}))
    with pytest.raises(ValueError) as refused:
        collect_runs.collect("fig2", "smoke", tmp_path / "fig2", [run_root])
    assert str(manifest) in str(refused.value) and "make fig2 SCALE=smoke" in str(refused.value)
    assert not (tmp_path / "fig2" / "runs.csv").exists()


def test_make_figures_refuses_a_runs_csv_without_its_sweep_record_or_with_another_sweeps(sweep, tmp_path):
    run_root, _, _ = sweep
    collect_runs.collect("fig2", "smoke", tmp_path / "fig2", [run_root])
    record = tmp_path / "fig2" / "sweep.json"
    written = json.loads(record.read_text())
    record.write_text(json.dumps({**written, "scale": "mini"}))
    with pytest.raises(ValueError, match=r"sweep.json records the fig2 sweep at scale mini, runs.csv holds fig2 "
                                         r"at scale smoke: collect it again: python scripts/collect_runs.py fig2"):
        make_figures.build("fig2", tmp_path)
    record.unlink()
    with pytest.raises(FileNotFoundError, match=r"fig2/sweep.json does not exist: .* collect it again: "
                                                r"python scripts/collect_runs.py fig2 --scale smoke"):
        make_figures.build("fig2", tmp_path)
    assert not (tmp_path / "fig2" / "fig2.png").exists()
