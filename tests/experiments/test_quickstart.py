"""`make run`'s job (experiments/quickstart.py) end to end at a few steps: the four arms as a user calls
them, the curves and the plot, a one-line summary, and finished runs reused on a second call."""

import csv

from experiments import quickstart


def test_quickstart_runs_its_arms_and_summarises_them_in_one_line(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    assert list(quickstart.ARMS) == ["MetaOptimize(model.parameters())", *(
        f"AdamW(model.parameters(), lr={lr})" for lr in ("1e-4", "1e-3", "1e-2"))]
    assert quickstart.ARMS[quickstart.META_ARM][1] == ["optimizer=metaopt_defaults"]  # the library's defaults

    summary = quickstart.main(steps=20, run_root=str(runs), out_dir=str(out))

    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["arm"] for row in rows} == set(quickstart.ARMS)
    assert all(float(row["train_loss"]) > 0 and float(row["test_loss"]) > 0 for row in rows)
    fixed = {row["arm"]: float(row["step_size"]) for row in rows if row["arm"] != quickstart.META_ARM}
    assert sorted(fixed.values()) == [1e-4, 1e-3, 1e-2]
    assert (out / "quickstart.png").stat().st_size > 10_000
    assert "\n" not in summary and summary in capsys.readouterr().out
    for part in ("20 steps", "MetaOptimize(model.parameters()): train loss", "test accuracy",
                 "learned step size", "best fixed AdamW lr", " s"):
        assert part in summary

    assert "4 of 4 runs reused" in quickstart.main(steps=20, run_root=str(runs), out_dir=str(out))
