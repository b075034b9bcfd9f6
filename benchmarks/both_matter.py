"""Both matter: EI goes up and GI stays where it was, measured on the project's own defaults.

Runs full fine-tuning, LoRA, MoEI and the two ablations (without intra: K=1; without inter:
``inter: none``) through the project's own CLI (``moei_lightning.cli.main``, in process), from the
same config (default ``conf/tiny.yaml``: the shipped GI-pretrained backbone and the bundled synthetic
EI/GI data), with the same steps and data. Every number comes from the ``FitSummary`` each fit
writes (``summary.json``): multiple-choice accuracy on the test split, EI per aspect, GI per
dimension, the mean inter gate on EI and GI prompts. Both of lm-evaluation-harness's accuracies are
kept (``acc``: highest summed log-likelihood; ``acc_norm``: per character) and a table is printed for
each; the learning-rate search, the claims and the figure read the summary's primary metric
(``primary_metric``, ``acc_norm`` for these records).

Learning rates: each method tries its grid (``LR_GRID``) with the first seed; the rate with the best
validation score, the mean of EI and GI validation accuracy, is kept for every seed (the test split
is never used to choose). ``--quick`` runs one seed at each grid's first rate, without the search,
and scores the test split only.
``--no-search`` keeps every grid's first rate (the config's own) for every seed.

Thread counts: a fit's numbers depend on how many threads sum its matrix products, so every run
records its count and ``--threads 1 2`` runs every seed at each count (default: torch's default,
what a user's machine gives). ``--jobs N`` runs N fits at once, each in its own process.

Training health: every run's worst loss-window ratio and its inter gate on GI prompts after it
shut (the ``health`` section of ``summary.json``); the figure beside the results shows every MoEI
run's gate trajectory.

    python benchmarks/both_matter.py --jobs 2              # 3 seeds, learning-rate search: ~30 min on 2 cores
    python benchmarks/both_matter.py --quick --threads 1 --jobs 2  # 1 seed, no search: two one-thread fits at once
    python benchmarks/both_matter.py --methods moei lora --seeds 5 --threads 1 2 --no-search --jobs 2  # 36 min
    python benchmarks/both_matter.py --out results.json --figure both_matter.png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPIKE_RATIO = 2.0  # a 25-step window's mean loss above this multiple of the previous window's is a spike
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (the interval of a mean over seeds).
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]

METHODS: dict[str, list[str]] = {
    "full": ["--model.adapter=full"],
    "lora": ["--model.adapter=lora"],
    "moei": [],
    "moei_no_intra": ["--model.molora.num_experts=1"],
    "moei_no_inter": ["--model.molora.inter=none"],
}
LABELS = {
    "full": "Full fine-tuning",
    "lora": "LoRA",
    "moei": "MoEI",
    "moei_no_intra": "MoEI w/o intra (K=1)",
    "moei_no_inter": "MoEI w/o inter",
}
# The first rate of each grid is the one --quick uses: the config's own rate for adapters (3e-3) and
# the usual full fine-tuning rate.
LR_GRID: dict[str, list[float]] = {
    "full": [1e-3, 3e-4],
    "lora": [3e-3, 1e-2],
    "moei": [3e-3, 1e-2],
    "moei_no_intra": [3e-3, 1e-2],
    "moei_no_inter": [3e-3, 1e-2],
}
# Only the fit and its summary: no per-epoch validation metrics, router statistics or logger.
QUIET = [
    "--trainer.logger=false",
    "--trainer.limit_val_batches=0",
    "--ei_metrics.stages=[]",
    "--router_stats.stages=[]",
    "--progress_bar.refresh_rate=0",
]


def fit(
    config: Path, method: str, lr: float, seed: int, run_dir: Path, extra: list[str], splits: list[str], threads: int
) -> dict[str, Any]:
    """One fit through the project's CLI on ``threads`` threads; its summary.json (scored on ``splits``), wall time.

    A run directory that already holds a finished fit's ``summary.json`` with those splits is read
    instead, so an interrupted benchmark continues where it stopped.
    """
    import torch

    from moei_lightning.cli import RUN_DIR_ENV, main

    torch.set_num_threads(threads)
    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if set(splits) <= set(summary["splits"]) and "primary_metric" in summary:  # else: an older layout
            return summary

    args = [
        "fit",
        f"--config={config}",
        f"--run_dir={run_dir}",
        f"--seed_everything={seed}",
        f"--model.optimizer.init_args.lr={lr}",
        *QUIET,
        f"--summary.splits=[{','.join(splits)}]",
        *METHODS[method],
        *extra,
    ]
    os.environ.pop(RUN_DIR_ENV, None)
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads only `args`
    start = time.perf_counter()
    try:
        main(args)
    finally:
        sys.argv = argv
    wall = time.perf_counter() - start
    summary = json.loads(done.read_text())
    summary["wall_s"], summary["threads"] = wall, threads
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def validation_score(summary: dict[str, Any]) -> float:
    """What the learning-rate search maximises: mean of EI and GI validation accuracy (primary) after the fit."""
    after, primary = summary["splits"]["val"]["after"], summary["primary_metric"]
    return (after["ei"][primary["ei"]]["avg"] + after["gi"][primary["gi"]]["avg"]) / 2


def accuracies(block: dict[str, Any], metric: str) -> dict[str, Any]:
    """One accuracy of a summary block: EI and GI averages, per aspect and per dimension."""
    return {
        "ei": block["ei"][metric]["avg"],
        "gi": block["gi"][metric]["avg"],
        "ei_aspects": _groups(block["ei"][metric]),
        "gi_dimensions": _groups(block["gi"][metric]),
    }


def by_metric(blocks: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Both accuracies of every run: metric -> field (``ei``, ``gi``, ``ei_aspects``, ``gi_dimensions``) -> runs."""
    metrics = list(blocks[0]["ei"])
    per_run = {metric: [accuracies(block, metric) for block in blocks] for metric in metrics}
    return {metric: {key: [run[key] for run in runs] for key in runs[0]} for metric, runs in per_run.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Phase 1: each method's grid on the first seed and thread count; phase 2: every other seed and thread count."""
    work = Path(args.work_dir)
    seeds = list(range(args.seeds))
    first = (seeds[0], args.threads[0])
    grids = {m: LR_GRID[m][:1] if args.quick or args.no_search else LR_GRID[m] for m in args.methods}
    jobs = [(m, lr, *first) for m in args.methods for lr in grids[m]]
    done = dict(zip(jobs, fit_all(args, jobs, work)))
    chosen = {m: grids[m][0] for m in args.methods if len(grids[m]) == 1}  # nothing to choose
    for method in args.methods:
        if method in chosen:
            continue
        for lr in grids[method]:
            print(f"[{method}] lr {lr:g}: validation score {validation_score(done[(method, lr, *first)]):.2f}")
        chosen[method] = max(grids[method], key=lambda lr, m=method: validation_score(done[(m, lr, *first)]))
    runs = [(seed, threads) for threads in args.threads for seed in seeds]
    rest = [(m, chosen[m], *run) for m in args.methods for run in runs if run != first]
    done.update(zip(rest, fit_all(args, rest, work)))
    primary = done[jobs[0]]["primary_metric"]
    if primary["ei"] != primary["gi"]:
        raise ValueError(f"EI and GI score with different accuracies {primary}; the tables compare one metric")
    results: dict[str, Any] = {
        "config": str(args.config),
        "primary_metric": primary["ei"],
        "seeds": seeds,
        "threads": args.threads,
        "torch_default_threads": args.default_threads,
        "methods": {},
    }
    for method in args.methods:
        per_run = [done[(method, chosen[method], *run)] for run in runs]
        tests = [s["splits"]["test"] for s in per_run]
        if "base" not in results:
            base = {metric: accuracies(tests[0]["before"], metric) for metric in tests[0]["before"]["ei"]}
            results["base"] = {**base[primary["ei"]], "by_metric": base}
        after = by_metric([t["after"] for t in tests])
        results["methods"][method] = {
            "lr": chosen[method],
            "lr_grid": grids[method],
            "runs": [{"seed": seed, "threads": threads} for seed, threads in runs],
            **after[primary["ei"]],  # ei, gi, ei_aspects, gi_dimensions: the primary accuracy
            "by_metric": after,
            "gate_ei": [t["after"]["gate_ei"] for t in tests],
            "gate_gi": [t["after"]["gate_gi"] for t in tests],
            "health": [_health(s.get("health", {})) for s in per_run],
            "trainable_parameters": per_run[0]["trainable_parameters"],
            "wall_s": [s.get("wall_s") for s in per_run],
        }
    return results


def fit_all(args: argparse.Namespace, jobs: list[tuple[str, float, int, int]], work: Path) -> list[dict[str, Any]]:
    """Every (method, lr, seed, threads) fit, ``args.jobs`` at a time, each in its own process."""
    splits = ["test"] if args.quick or args.no_search else ["val", "test"]  # validation only chooses learning rates
    calls = [
        (args.config, m, lr, seed, work / f"{m}-lr{lr:g}-s{seed}-t{threads}", args.extra, splits, threads)
        for m, lr, seed, threads in jobs
    ]
    results: dict[int, dict[str, Any]] = {}
    for threads in sorted({call[-1] for call in calls}):
        group = [i for i, call in enumerate(calls) if call[-1] == threads]
        # Never more threads than cores: an oversubscribed OpenMP team spin-waits and runs many times slower.
        jobs = max(1, min(args.jobs, (os.cpu_count() or 1) // threads))
        if jobs == 1:
            results |= {i: fit(*calls[i]) for i in group}
            continue
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results |= dict(zip(group, pool.map(_fit_call, [calls[i] for i in group])))
    return [results[i] for i in range(len(calls))]


def _fit_call(call: tuple) -> dict[str, Any]:
    return fit(*call)


def _health(health: dict[str, Any]) -> dict[str, Any]:
    """What the table and the figure need from a run's health section."""
    windows = health.get("windows", [])
    return {
        "worst_loss_ratio": health.get("worst_loss_ratio"),
        "spikes": [s["step"] for s in health.get("spikes", [])],
        "gate_gi_worst_after_shut": health.get("gate_gi_worst_after_shut"),
        "gate_reopened": [e["step"] for e in health.get("gate_reopened", [])],
        "trajectory": [[w["end_step"], w.get("gate_ei"), w.get("gate_gi")] for w in windows],
    }


def _groups(accuracy: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in accuracy.items() if key != "avg"}


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else float("nan")


def _pm(values: list[float | None], digits: int = 1) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.fmean(present):.{digits}f}±{statistics.stdev(present):.{digits}f}"


def table(results: dict[str, Any], metric: str) -> str:
    """The paper-shaped table of one accuracy: EI per aspect, GI per dimension, changes against the base, gates,
    time."""
    base = results["base"]["by_metric"][metric]
    aspects, dims = list(base["ei_aspects"]), list(base["gi_dimensions"])
    header = ["method", *aspects, "EI", "ΔEI", *dims, "GI", "ΔGI", "gate EI", "gate GI", "wall s"]
    rows = [
        [
            "base (backbone)",
            *[f"{base['ei_aspects'][a]:.1f}" for a in aspects],
            f"{base['ei']:.1f}",
            "",
            *[f"{base['gi_dimensions'][d]:.1f}" for d in dims],
            f"{base['gi']:.1f}",
            "",
            "",
            "",
            "",
        ]
    ]
    for name, method in results["methods"].items():
        m = {**method, **method["by_metric"][metric]}
        rows.append(
            [
                f"{LABELS[name]} (lr {m['lr']:g})",
                *[_pm([s[a] for s in m["ei_aspects"]]) for a in aspects],
                _pm(m["ei"]),
                f"{_mean(m['ei']) - base['ei']:+.1f}",
                *[_pm([s[d] for s in m["gi_dimensions"]]) for d in dims],
                _pm(m["gi"]),
                f"{_mean(m['gi']) - base['gi']:+.1f}",
                _pm(m["gate_ei"], 3),
                _pm(m["gate_gi"], 3),
                f"{_mean(m['wall_s']):.0f}",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_table(results: dict[str, Any], method: str) -> str:
    """One row per run (seed x threads): EI and GI change (the primary accuracy, then the others after a slash),
    the worst GI dimension, gates and training health."""
    base, m = results["base"], results["methods"][method]
    primary = results.get("primary_metric")
    others = [metric for metric in base.get("by_metric", {}) if metric != primary]
    views = [metric_view(results, None), *(metric_view(results, metric) for metric in others)]
    names = " / ".join([primary or "", *others]) if others else ""
    header = [
        "seed",
        "threads",
        f"ΔEI ({names})" if names else "ΔEI",
        f"ΔGI ({names})" if names else "ΔGI",
        "worst GI dim",
        "gate EI",
        "gate GI",
        "worst loss ratio",
        "GI gate after shut",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (run, dims, gate_ei, gate_gi, health) in enumerate(
        zip(m["runs"], m["gi_dimensions"], m["gate_ei"], m["gate_gi"], m["health"])
    ):
        worst_dim = min(dims, key=lambda d: dims[d] - base["gi_dimensions"][d])
        ratio, after_shut = health["worst_loss_ratio"], health["gate_gi_worst_after_shut"]
        changes = {
            key: " / ".join(f"{v['methods'][method][key][i] - v['base'][key]:+.1f}" for v in views)
            for key in ("ei", "gi")
        }
        cells = [
            str(run["seed"]),
            str(run["threads"]),
            changes["ei"],
            changes["gi"],
            f"{worst_dim} {dims[worst_dim] - base['gi_dimensions'][worst_dim]:+.1f}",
            "n/a" if gate_ei is None else f"{gate_ei:.3f}",
            "n/a" if gate_gi is None else f"{gate_gi:.3f}",
            "n/a" if ratio is None else f"{ratio:.2f}",
            "n/a" if after_shut is None else f"{after_shut:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95 % Student-t interval (the mean twice for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T975[min(len(values) - 1, len(T975)) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def targets(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """The claim, checked on every run: MoEI keeps GI and every GI dimension, its gate shuts on GI and stays shut
    (no loss spike), and it gains at least LoRA's EI (the paired difference with its 95 % interval). The accuracy
    checks run on the primary metric and again on every other one in ``by_metric``, prefixed with its name."""
    methods = results["methods"]
    checks = []
    if "moei" in methods:
        moei = methods["moei"]
        gates = [g for g in moei["gate_gi"] if g is not None]
        checks.append((f"MoEI gate on GI <= 0.05 in every run (worst {max(gates):.3f})", max(gates) <= 0.05))
        checks.append((f"MoEI mean gate on EI >= 0.9 ({_mean(moei['gate_ei']):.3f})", _mean(moei["gate_ei"]) >= 0.9))
        ratios = [h["worst_loss_ratio"] or 0.0 for h in moei["health"]]
        checks.append(
            (
                f"No loss spike in any MoEI run (worst window ratio {max(ratios):.2f} <= {SPIKE_RATIO:g})",
                max(ratios) <= SPIKE_RATIO,
            )
        )
    primary = results.get("primary_metric")
    for metric in [None, *(m for m in results["base"].get("by_metric", {}) if m != primary)]:
        prefix = "" if metric is None else f"{metric}: "
        checks += [(prefix + text, ok) for text, ok in accuracy_targets(metric_view(results, metric))]
    return checks


def metric_view(results: dict[str, Any], metric: str | None) -> dict[str, Any]:
    """``results`` with the base's and every method's accuracies those of ``metric`` (None: as stored, the primary)."""
    if metric is None:
        return results
    methods = {name: {**m, **m["by_metric"][metric]} for name, m in results["methods"].items()}
    return {**results, "base": {**results["base"], **results["base"]["by_metric"][metric]}, "methods": methods}


def accuracy_targets(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """MoEI's GI change overall and per dimension in every run, and its EI gain against LoRA's, paired by run."""
    base, methods = results["base"], results["methods"]
    if "moei" not in methods:
        return []
    moei = methods["moei"]
    changes = [g - base["gi"] for g in moei["gi"]]
    n = len(changes)
    checks = [(f"MoEI GI change >= -1.0 in every run (worst {min(changes):+.1f} of {n})", min(changes) >= -1.0)]
    dims = [s[d] - base["gi_dimensions"][d] for s in moei["gi_dimensions"] for d in s]
    checks.append((f"MoEI every GI dimension within 2 points in every run (worst {min(dims):+.1f})", min(dims) >= -2.0))
    if "lora" in methods:
        paired = seed_means([a - b for a, b in zip(moei["ei"], methods["lora"]["ei"])], moei["runs"])
        mean, low, high = mean_interval(paired)
        checks.append(
            (
                f"MoEI EI gain >= LoRA EI gain (mean difference {mean:+.1f} points, 95 % interval "
                f"[{low:+.1f}, {high:+.1f}] over {len(paired)} seeds, each its runs' mean)",
                mean >= 0.0,
            )
        )
    return checks


def seed_means(values: list[float], runs: list[dict[str, int]]) -> list[float]:
    """One value per seed, the mean over its runs (thread counts): the seed is what is replicated, and one seed's
    runs at two thread counts are not independent (LoRA's come out identical)."""
    by_seed: dict[int, list[float]] = {}
    for value, run in zip(values, runs):
        by_seed.setdefault(run["seed"], []).append(value)
    return [statistics.fmean(group) for group in by_seed.values()]


def figure(results: dict[str, Any], path: Path) -> None:
    """Left: EI and GI change against the base per method, one dot per run. Right: every MoEI run's inter gate
    on EI and GI prompts over training (means over the health windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, methods = results["base"], results["methods"]
    names = list(methods)
    fig, (ax, gates) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for offset, (domain, colour) in zip((-width / 2, width / 2), (("ei", "tab:red"), ("gi", "tab:blue"))):
        changes = [[v - base[domain] for v in methods[n][domain]] for n in names]
        xs = [i + offset for i in range(len(names))]
        ax.bar(
            xs,
            [statistics.fmean(c) for c in changes],
            width,
            color=colour,
            alpha=0.75,
            label=f"{domain.upper()} change (points)",
        )
        for x, c in zip(xs, changes):
            ax.scatter([x] * len(c), c, color="black", s=8, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=15)
    ax.set_ylabel("accuracy change vs backbone")
    ax.set_title(f"EI gained and GI kept (base EI {base['ei']:.1f}, GI {base['gi']:.1f}; dots: runs)")
    ax.legend(frameon=False)
    for run, health in zip(methods.get("moei", {}).get("runs", []), methods.get("moei", {}).get("health", [])):
        steps = [w[0] for w in health["trajectory"]]
        style = "-" if run["threads"] == results["threads"][0] else "--"
        for column, colour in ((1, "tab:red"), (2, "tab:blue")):
            gates.plot(steps, [w[column] for w in health["trajectory"]], style, color=colour, alpha=0.5, linewidth=1)
    gates.axhline(0.05, color="black", linewidth=0.6, linestyle=":")
    gates.set_ylim(-0.02, 1.02)
    gates.set_xlabel("training step")
    gates.set_ylabel("mean inter gate (window)")
    threads = " / ".join(f"{t} ({'solid' if i == 0 else 'dashed'})" for i, t in enumerate(results["threads"]))
    gates.set_title(f"MoEI gate on EI (red) and GI (blue) prompts; threads {threads}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, default=REPO / "conf" / "tiny.yaml", help="the config every method starts from"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (0..N-1)")
    parser.add_argument("--quick", action="store_true", help="one seed, each grid's first learning rate, no search")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("both_matter.json"), help="results JSON")
    parser.add_argument("--figure", type=Path, default=Path("both_matter.png"), help="figure path (PNG)")
    parser.add_argument("--work-dir", default="runs/both_matter", help="where the runs' directories go")
    parser.add_argument("--no-search", action="store_true", help="every grid's first rate for every seed")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: torch's)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="fits at once, each in its own process (at most cores / threads)"
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables and targets of a results JSON; nothing runs"
    )
    parser.add_argument("extra", nargs="*", help="further CLI overrides for every run, after --")
    args = parser.parse_args(argv)
    if args.report is not None:
        print_results(json.loads(args.report.read_text(encoding="utf-8")))
        return 0
    if args.quick:
        args.seeds = 1
    import torch

    args.default_threads = torch.get_num_threads()
    args.threads = args.threads or [args.default_threads]
    start = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)
    try:
        figure(results, args.figure)
        print(f"\nfigure: {args.figure}")
    except ImportError:
        print("\nfigure skipped: matplotlib is not installed (pip install matplotlib)")
    print(f"results: {args.out}  ({results['wall_s'] / 60:.1f} min)")
    return 0


def print_results(results: dict[str, Any]) -> None:
    """Both accuracies' tables (the primary first), every run of each method, and the targets."""
    for metric in sorted(results["base"]["by_metric"], key=lambda m: m != results["primary_metric"]):
        which = "primary, the claims' metric" if metric == results["primary_metric"] else "for comparison"
        print(f"\n{metric} ({which}):\n\n{table(results, metric)}")
    for method in results["methods"]:
        print(f"\n{LABELS[method]}, every run:\n\n{run_table(results, method)}")
    print()
    for text, ok in targets(results):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    sys.exit(main())
