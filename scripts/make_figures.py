"""Rebuild the paper's figures from results/<item>/runs.csv alone (no W&B, no GPU, no run folders).

    python scripts/make_figures.py              # every item that has a results/<item>/runs.csv
    python scripts/make_figures.py fig1 fig3    # these; an item without runs.csv is an error

For each item it checks runs.csv against the sweep's runs that results/<item>/sweep.json lists (written
with it by scripts/collect_runs.py from the sweep's manifest) and stops, naming them, if a run is missing
or unfinished. Then:
- a tuned grid (figure.tuned: fixed step sizes, cosine peaks, DoG's initial movement, gdtuo's
  and mechanic's variants) becomes one curve: in a sweep tuned on one seed (hydra.sweeper.tune_seed),
  the setting its tuning chose (sweep.json's chosen: the one that ran the other seeds), else the
  setting with the best mean final figure.select.metric over seeds; a run that diverged ranks last;
- results/<item>/<item>.png: the curves (mean over seeds, band of +-1 std when n > 1) of each
  figure.metrics row for each figure.panels column, or, for kind step_sizes, every step size the
  runs logged (one per block for the blockwise runs); the arms that figure.baselines lists dashed, the others
  (MetaOptimize's) solid;
- results/<item>/summary.csv: every setting's final values (mean, std, n), and which were chosen;
- for Table 1 (kind table), results/table1/table1.md: each optimizer's median training-step time
  and peak memory against the baseline's (AdamW), one column pair per task;
- for the drop-in benchmark (kind dropin, experiments/dropin.py), results/dropin/dropin.png and
  dropin.md: every arm's train loss and test metric at the horizons, and the MetaOptimize arms' goals;
- for the continual setting (kind continual), results/continual/continual.png and continual.md: each
  learner's online loss, and its mean over the last quarter of each stream;
- for the beyond item (kind beyond, experiments/beyond.py), results/beyond/beyond.png and beyond.md:
  the final metrics against the initial value of a learned hyper-parameter, learned and fixed, and its trajectories.
An arm's label is figure.labels' entry for it where the item's config has one, else its name.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import beyond, dropin  # noqa: E402
from experiments.reproduce import ITEMS, compose_experiment  # noqa: E402
from experiments.files import read_json  # noqa: E402
from experiments.sweeps import Run, expected_runs, select  # noqa: E402
from experiments.schema import (COSTS, PROGRESS, QUALITY, STEP_SIZE, final, is_step_size, mean_over_last,  # noqa: E402
                                run_key, score, steady_median, swept_keys)

SUMMARY_METRICS = (*QUALITY, STEP_SIZE)


class MissingRuns(RuntimeError):
    """runs.csv lacks runs that the experiment's sweep expects, or holds unfinished ones."""


def read_runs(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `make {path.parent.name}` (it sweeps, then collects)")
    with open(path, newline="") as f:
        text = f.read()
    again = f"collect it again: python scripts/collect_runs.py {path.parent.name} --scale <scale> --out {path.parent}"
    if text and not text.endswith("\n"):
        raise ValueError(f"{path} is torn: its last line has no line break (a write cut off by a kill or a full "
                         f"disk), so its last values cannot be trusted; {again}")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    numeric = [column for column in reader.fieldnames or [] if column in (*PROGRESS, *QUALITY, *COSTS)
               or is_step_size(column)]
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise ValueError(f"{path}, line {number}: {len(reader.fieldnames)} columns expected, the row has "
                             f"{sum(value is not None for key, value in row.items() if key is not None) + len(row.get(None) or [])}"
                             f"; {again}")
        for column in numeric:
            try:
                float(row[column] or 0)
            except ValueError:
                raise ValueError(f"{path}, line {number}: {column} is {row[column]!r}, not a number; {again}") from None
    return rows


def read_sweep_record(path: Path, item: str, scale: str) -> dict:
    """The sweep.json beside runs.csv (scripts/collect_runs.py writes both): the sweep's runs, each
    tuned grid's chosen setting, and the seed it was tuned on."""
    again = f"collect it again: python scripts/collect_runs.py {item} --scale {scale} --out {path.parent}"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: it lists the sweep's runs and the settings its tuning "
                                f"chose, and is written with runs.csv; {again}")
    record = read_json(str(path), again)
    try:
        runs = [Run(entry["grid"], tuple(entry["overrides"]), entry["arm"]) for entry in record["runs"]]
        record = {**record, "runs": runs, "chosen": dict(record["chosen"]), "tune_seed": record["tune_seed"]}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a sweep record ({type(error).__name__}: {error}); {again}") from None
    if (record.get("item"), record.get("scale")) != (item, scale):
        raise ValueError(f"{path} records the {record.get('item')} sweep at scale {record.get('scale')}, "
                         f"runs.csv holds {item} at scale {scale}: {again}")
    return record


def group_runs(item: str, rows: list[dict[str, str]], path: Path | None = None):
    """(cfg, scale, the sweep's runs with their rows, its sweep.json record); raises MissingRuns naming
    every absent or unfinished run. path: the runs.csv they come from, which the errors name (default:
    results/<item>/runs.csv); sweep.json is read beside it."""
    path = path or Path("results") / item / "runs.csv"
    if not rows:
        raise MissingRuns(f"{path} holds no runs: run `make {item}` (SCALE=...) first")
    scales = {row["scale"] for row in rows}
    if len(scales) != 1:
        raise ValueError(f"{path} mixes scales {sorted(scales)}: collect one scale per item")
    scale = scales.pop()
    cfg = compose_experiment(item, scale)
    absent = [metric for metric in cfg.figure.get("metrics") or [] if not any(
        column == metric or (metric == STEP_SIZE and is_step_size(column)) for column in rows[0])]
    if absent:
        raise ValueError(f"{path} has no column {', '.join(absent)}, which the figure draws "
                         f"(figure.metrics of conf/experiment/{item}.yaml): collect it again from the run folders")
    sweep = read_sweep_record(path.parent / "sweep.json", item, scale)
    expected = sweep["runs"]
    swept = swept_keys(run.values for run in expected)
    by_run = defaultdict(list)
    for row in rows:  # a row's run key, as Run.key, from its columns of the swept keys
        by_run[(run_key({k: row.get(k, "") for k in swept}), row["seed"])].append(row)
    runs, problems = [], []
    for run in expected:
        seed = run.values.get("seed", "0")
        run_rows = by_run.get((run.key, seed))
        if not run_rows:
            problems.append(f"missing: {run.key} seed={seed}")
        elif run_rows[0]["status"] not in ("finished", "failed"):
            problems.append(f"not finished ({run_rows[0]['status']}): {run.key} seed={seed}")
        else:
            runs.append((run, run_rows))
    if problems:
        raise MissingRuns(f"{path} does not hold the whole {item} sweep at scale {scale} "
                          f"({len(problems)} of {len(problems) + len(runs)} runs):\n  " + "\n  ".join(problems)
                          + f"\nrun `make {item} SCALE={scale}` (finished runs are skipped), then collect again")
    return cfg, scale, runs, sweep


def curves(cfg, runs, sweep):
    """{arm: (label, [rows of each seed])}: every untuned setting, and each tuned grid's best: the setting
    its tuning chose (sweep["chosen"]), else the best mean over seeds. The summary ranks the others."""
    settings = defaultdict(list)  # (arm, key) -> rows of each seed
    for run, rows in runs:
        settings[(run.arm, run.key)].append(rows)
    rule, seed = select(cfg), sweep["tune_seed"]
    labels = dict(cfg.figure.get("labels") or {})  # an arm's label, where the item's config declares one

    def ranking(seeds: list) -> float:  # on the tuning seed alone, if the sweep tuned on one
        return score([rows for rows in seeds if seed is None or rows[0]["seed"] == seed], **rule)

    chosen, summary = {}, []
    for arm in dict.fromkeys(arm for arm, _ in settings):
        candidates = {key: seeds for (a, key), seeds in settings.items() if a == arm}
        ranked = sorted(candidates, key=lambda key: ranking(candidates[key])) if len(candidates) > 1 else list(candidates)
        best = sweep["chosen"].get(arm, ranked[0])
        tuned = len(candidates) > 1
        name = labels.get(arm, arm.replace("optimizer.", ""))
        label = f"{name} ({_varying(best, candidates)})" if tuned else name
        chosen[arm] = (label, candidates[best])
        for key in ranked:
            summary.append(_summary_row(arm, key, candidates[key], tuned, key == best))
    return chosen, summary


def _varying(best: str, candidates: dict) -> str:
    """The part of the best setting's key that differs between the candidates (e.g. optimizer.lr=0.001)."""
    split = [dict(part.split("=", 1) for part in key.split()) for key in candidates]
    best_values = dict(part.split("=", 1) for part in best.split())
    keys = [k for k in best_values if len({s.get(k) for s in split}) > 1]
    return ", ".join(f"{k.removeprefix('optimizer.')}={best_values[k]}" for k in keys) + ", tuned"


def _summary_row(arm: str, key: str, seeds: list, tuned: bool, selected: bool) -> dict:
    row = {"arm": arm, "setting": key, "selected": ("yes" if selected else "no") if tuned else "-",
           "n": len(seeds), "status": "/".join(sorted({rows[0]["status"] for rows in seeds}))}
    for metric in SUMMARY_METRICS:
        values = [final(rows, metric) for rows in seeds]
        finite = [v for v in values if math.isfinite(v)]
        row[f"{metric} mean"] = statistics.fmean(finite) if len(finite) == len(values) and finite else ""
        row[f"{metric} std"] = statistics.stdev(finite) if len(finite) == len(values) and len(finite) > 1 else ""
    return row


def panel_arms(entries, chosen, runs) -> list[str]:
    """A panel's curves: an entry is an arm, or a grid whose arms all go in."""
    arms = []
    for entry in entries:
        if entry in chosen:
            arms.append(entry)
            continue
        members = list(dict.fromkeys(run.arm for run, _ in runs if run.grid == entry))
        if not members:
            raise ValueError(f"figure.panels names {entry!r}, which is neither an arm nor a grid of the sweep")
        arms += members
    return arms


def _series(seeds: list[list[dict[str, str]]], metric: str):
    """Steps and the mean / std over seeds of metric at the steps every seed logged it."""
    per_seed = [{int(r["step"]): float(r[metric]) for r in rows if r.get(metric, "") != ""} for rows in seeds]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    means = [statistics.fmean(s[step] for s in per_seed) for step in steps]
    stds = [statistics.stdev(s[step] for s in per_seed) if len(per_seed) > 1 else 0.0 for step in steps]
    return steps, means, stds


def plot(item: str, cfg, chosen, runs, out: Path) -> None:
    fig_cfg = cfg.figure
    panels = list(fig_cfg.panels)
    step_size_kind = fig_cfg.kind == "step_sizes"
    baselines = set(fig_cfg.get("baselines") or [])  # dashed; MetaOptimize's arms solid
    metrics = list(fig_cfg.metrics)
    nrows = 1 if step_size_kind else len(metrics)
    size = tuple(fig_cfg.get("size") or (max(6.4, 4.8 * len(panels)), 3.4 * nrows))  # figure.size: [width, height]
    fig, axes = plt.subplots(nrows, len(panels), figsize=size, squeeze=False)
    for col, panel in enumerate(panels):
        for arm_index, arm in enumerate(panel_arms(panel.arms, chosen, runs)):
            label, seeds = chosen[arm]
            color = f"C{arm_index % 10}"
            if step_size_kind:
                ax = axes[0][col]
                columns = [k for k in seeds[0][0] if is_step_size(k)]
                for block_index, column in enumerate(columns):
                    steps, means, _ = _series(seeds, column)
                    ax.plot(steps, means, color=f"C{block_index % 10}", label=column.removeprefix("step_size/"))
                ax.set_yscale("log")
                ax.set_ylabel("step size")
                continue
            for row, metric in enumerate(metrics):
                ax = axes[row][col]
                steps, means, stds = _series(seeds, metric)
                if not steps:
                    continue
                ax.plot(steps, means, color=color, label=label, linestyle="--" if arm in baselines else "-")
                if len(seeds) > 1:
                    ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                    color=color, alpha=0.15)
                ax.set_ylabel(metric)
                if is_step_size(metric) or metric.endswith("loss"):
                    ax.set_yscale("log")
        axes[0][col].set_title(panel.title)
        for row in range(nrows):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
        if fig_cfg.get("legend") == "below":  # many curves: the legend under the panel, not over its curves
            axes[-1][col].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        else:
            axes[0][col].legend(fontsize=7)
    scale = scale_label(item, cfg, runs, separator="\n")  # the stand-ins on a line of their own
    fig.suptitle(f"{fig_cfg.title} ({scale})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{item}.png", dpi=110)
    plt.close(fig)


def sensitivity_plot(item: str, cfg, chosen, runs, out: Path) -> None:
    """One panel per figure.sweeps entry: the final metric (mean over seeds) against the swept key,
    one line per optimizer and variant among the runs that hold the other key at the paper's value;
    the tuned fixed step of the matching base (figure.fixed) as a horizontal line."""
    fig_cfg = cfg.figure
    metric = fig_cfg.metrics[0]
    sweeps = list(fig_cfg.sweeps)
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.2 * len(sweeps), 3.8), squeeze=False)
    fixed_of = dict(fig_cfg.fixed)
    colors = {}
    for col, sweep in enumerate(sweeps):
        ax = axes[0][col]
        lines = defaultdict(lambda: defaultdict(list))  # (optimizer, variant) -> swept value -> final per seed
        for run, rows in runs:
            values = run.values
            held = all(float(values.get(k, "nan")) == float(v) for k, v in sweep.held.items())
            if values.get("optimizer") in fixed_of and sweep.key in values and held:
                lines[(values["optimizer"], values.get("optimizer.variant", "standard"))][float(values[sweep.key])].append(
                    final(rows, metric) if rows[0]["status"] == "finished" else math.nan)
        finite_values = [v for points in lines.values() for seeds in points.values() for v in seeds if math.isfinite(v)]
        top = max(finite_values) * 1.5 if finite_values else 1.0
        for (optimizer, variant), points in sorted(lines.items()):
            color = colors.setdefault(optimizer, f"C{len(colors)}")
            xs = sorted(points)
            means = [statistics.fmean(points[x]) if all(math.isfinite(v) for v in points[x]) else math.nan for x in xs]
            ax.plot(xs, means, marker="o", color=color, linestyle="-" if variant == "released" else ":",
                    label=f"{optimizer.removeprefix('metaopt_')} ({variant})")
            diverged = [x for x, m in zip(xs, means) if not math.isfinite(m)]
            ax.plot(diverged, [top] * len(diverged), "x", color=color, markersize=9)
        for optimizer, grid in fixed_of.items():
            if grid in chosen and optimizer in colors:
                label, seeds = chosen[grid]
                ax.axhline(statistics.fmean(final(rows, metric) for rows in seeds), color=colors[optimizer],
                           linestyle="--", linewidth=1, label=f"fixed {label}")
        ax.axvline(float(sweep.paper), color="grey", linewidth=1, label="the paper's value")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(sweep.key.removeprefix("optimizer."))
        ax.set_ylabel(f"final {metric}")
        ax.set_title(sweep.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    scale = scale_label(item, cfg, runs, separator="\n")
    fig.suptitle(f"{fig_cfg.title} ({scale}); x: diverged", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{item}.png", dpi=110)
    plt.close(fig)


def cfg_scale(cfg) -> str:
    return cfg.hydra.runtime.choices.get("scale", "full")


def scale_label(item: str, cfg, runs, separator: str = "; ") -> str:
    """The scale, and, where its runs trained other data or models than the item's at full scale, which
    stood in for which, as the composed configs name them: "mini scale; fashion_mnist, mlp_6blocks in
    place of cifar10, resnet18_cifar" (``separator`` between the two)."""
    scale = cfg_scale(cfg)
    if scale == "full":
        return "full scale"
    task = ("dataset", "model")
    paper = {run.grid: tuple(run.values.get(key) for key in task) for run in expected_runs(compose_experiment(item, "full"))}
    ran = {run.grid: tuple(rows[0].get(key) for key in task) for run, rows in runs}
    stand_ins = dict.fromkeys((ran[grid], paper[grid]) for grid in ran if grid in paper and ran[grid] != paper[grid])
    return separator.join([f"{scale} scale"] + [f"{', '.join(filter(None, used))} in place of {', '.join(filter(None, of))}"
                                          for used, of in stand_ins])


def median_step_ms(rows: list[dict[str, str]]) -> float:
    """The median time of a training step over the logged windows, leaving out the first (warm-up),
    as the trainer's own summary does."""
    return steady_median([float(row["time/step_ms"]) for row in rows if row.get("time/step_ms", "") != ""])


def table(item: str, cfg, runs, out: Path) -> Path:
    """Table 1 as markdown: time and peak memory of each optimizer against the baseline's, per task."""
    fig_cfg = cfg.figure
    grids = [panel.arms[0] for panel in fig_cfg.panels if any(run.grid == panel.arms[0] for run, _ in runs)]
    titles = {panel.arms[0]: panel.title for panel in fig_cfg.panels}
    measured = defaultdict(dict)  # grid -> arm -> (step ms, peak MB), means over seeds
    for grid in grids:
        seeds = defaultdict(list)
        for run, rows in runs:
            if run.grid == grid:
                seeds[run.arm].append((median_step_ms(rows), final(rows, "memory/peak_mb")))
        for arm, values in seeds.items():
            measured[grid][arm] = tuple(statistics.fmean(v) for v in zip(*values))
    arms = list(dict.fromkeys(arm for grid in grids for arm in measured[grid]))
    header = "| optimizer | " + " | ".join(f"{titles[g]}: step ms | time | peak MB | memory" for g in grids) + " |"
    lines = [f"# {fig_cfg.title} ({scale_label(item, cfg, runs)})", "",
             f"Time: (T_alg - T_{fig_cfg.baseline}) / T_{fig_cfg.baseline}, T the median training-step time. "
             "Memory: peak memory against the baseline's (the paper's space overhead compares the largest "
             "batches that fit instead: scripts/bench_overhead.py).", "",
             header, "|" + " --- |" * (1 + 4 * len(grids))]
    for arm in arms:
        cells = []
        for grid in grids:
            if arm not in measured[grid]:
                cells += ["-"] * 4
                continue
            (ms, mb), (base_ms, base_mb) = measured[grid][arm], measured[grid][fig_cfg.baseline]
            cells += [f"{ms:.1f}", f"{(ms - base_ms) / base_ms:+.0%}", f"{mb:.0f}", f"{(mb - base_mb) / base_mb:+.0%}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    path = out / f"{item}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def dropin_report(item: str, cfg, chosen, runs, out: Path) -> None:
    """The drop-in benchmark: <item>.png (one column per task) and <item>.md (values and goals)."""
    tasks = dropin.report(cfg, runs, chosen)
    dropin.plot(cfg.figure, cfg_scale(cfg), tasks, out / f"{item}.png")
    seeds = sorted({rows[0]["seed"] for _, rows in runs}, key=int)
    text = dropin.markdown(cfg.figure.title, cfg_scale(cfg), tasks, [int(h) for h in cfg.figure.horizons],
                           cfg.figure.goals, seeds)
    (out / f"{item}.md").write_text(text)


def continual_report(item: str, cfg, chosen, runs, out: Path) -> None:
    """The continual setting: <item>.png (the online loss of each learner's reported setting, one column
    per stream) and <item>.md, the table: each learner's mean online loss over the last fraction of the
    stream (figure.select.last_fraction), mean +- standard deviation over seeds, best first."""
    plot(item, cfg, chosen, runs, out)
    fig_cfg, fraction = cfg.figure, float(cfg.figure.select.last_fraction)
    lines = [f"# {fig_cfg.title} ({scale_label(item, cfg, runs)})", "",
             f"Made by `make continual` (conf/experiment/continual.yaml). Each number is the mean online loss (the "
             f"loss of each batch before the learner steps on it) over the last {fraction:.0%} of the stream, mean "
             "+- standard deviation over seeds; a grid reports its best setting, chosen in hindsight by this same "
             "number (a run that diverged ranks last). The curves: continual.png; every run: runs.csv.", ""]
    for panel in fig_cfg.panels:
        scored = []
        for arm in panel_arms(panel.arms, chosen, runs):
            label, seeds = chosen[arm]
            values = [mean_over_last(rows, "train/loss", fraction) if rows[0]["status"] == "finished" else math.inf
                      for rows in seeds]
            finite = all(math.isfinite(v) for v in values)
            scored.append((statistics.fmean(values) if finite else math.inf,
                           statistics.pstdev(values) if finite else math.nan, label, len(seeds)))
        lines += [f"## {panel.title}", "", f"| learner | online loss, last {fraction:.0%} | seeds |", "|---|---|---|"]
        lines += [f"| {label} | {mean:.4g} +- {std:.2g} | {n} |" for mean, std, label, n in sorted(scored)]
        lines.append("")
    (out / f"{item}.md").write_text("\n".join(lines))


def beyond_report(item: str, cfg, chosen, runs, out: Path) -> None:
    """Hyper-parameters learned beyond the step size (experiments/beyond.py): <item>.png and <item>.md."""
    sweeps = beyond.report(cfg, runs, chosen)
    scale = scale_label(item, cfg, runs)
    beyond.plot(cfg.figure.title, scale, sweeps, out / f"{item}.png")
    (out / f"{item}.md").write_text(beyond.markdown(cfg.figure.title, scale, sweeps))


# figure.kind -> the function that draws it (kind table writes markdown instead: table())
RENDERERS = {"curves": plot, "step_sizes": plot, "sensitivity": sensitivity_plot, "dropin": dropin_report,
             "continual": continual_report, "beyond": beyond_report}


def build(item: str, results: Path) -> Path:
    """Check, plot (or tabulate) and summarise one item; returns the figure's or table's path."""
    out = results / item
    rows = read_runs(out / "runs.csv")
    cfg, _, runs, sweep = group_runs(item, rows, out / "runs.csv")
    chosen, summary = curves(cfg, runs, sweep)
    if cfg.figure.kind == "table":
        figure = table(item, cfg, runs, out)
    else:
        RENDERERS[cfg.figure.kind](item, cfg, chosen, runs, out)
        figure = out / f"{item}.png"
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help=f"of {', '.join(ITEMS)}; default: every item with a runs.csv")
    parser.add_argument("--results", default="results", help="the folder that holds <item>/runs.csv")
    args = parser.parse_args(argv)
    results = Path(args.results)
    unknown = [item for item in args.items if item not in ITEMS]
    if unknown:
        parser.error(f"unknown items {unknown}: use {', '.join(ITEMS)}")
    items = args.items or [item for item in ITEMS if (results / item / "runs.csv").exists()]
    if not items:
        raise SystemExit(f"no {results}/<item>/runs.csv: run `make fig1` (or `make mini`) first")
    for item in ITEMS:
        if item not in items and not args.items:
            print(f"{item}: no {results / item / 'runs.csv'} yet (make {item})")
    for item in items:
        print(f"{item}: {build(item, results)}")


if __name__ == "__main__":
    main()
