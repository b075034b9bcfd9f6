"""The GPU check's targets and Markdown report, computed from its JSON (``benchmarks/gpu_check.py``).

    python benchmarks/gpu_check_report.py OUT/gpu_check.json    # the Markdown again, e.g. after editing a target

Targets, each a PASS or FAIL line (SKIP in a ``--smoke`` run, whose tiny CPU numbers say nothing
about them, and for the time target in a run of some steps only; FAIL when the step that measures
it gave no result):

- MoLoRA K=8 r=8 (prompt routing, gate loss) trains at least as many tokens/s as PEFT's LoRA r=64
  at LLaMA-2-7B width in bf16 (median over rounds of PEFT's step time over MoLoRA's, same round);
- its CUDA memory (the step's peak above what stays allocated, plus trainable tensors and AdamW
  state) is at most PEFT's + 5 %;
- own LoRA r=64 trains at least as many tokens/s as PEFT's;
- MoEI generates within 10 % of PEFT's LoRA tokens/s at batch 1 and at batch 16;
- the tiny default in bf16 on the GPU keeps GI within 1 point and shuts its gate on GI prompts
  (mean gate <= 0.05) on the validation split;
- FSDP2 on one GPU: a step runs, the adapter-only checkpoint saves and loads;
- the whole check, install included when ``--since`` was given, within its time (480 s).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MEMORY_SLACK = 1.05
GENERATION_FLOOR = 0.90
GI_CHANGE_FLOOR = -1.0
GATE_GI_CEILING = 0.05

Measure = Callable[[dict[str, Any]], tuple[float | None, str]]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its verdict, the value it was judged on, and how that value came about."""
    found = [
        judge(
            report,
            "MoLoRA K=8 r=8 training tokens/s >= PEFT LoRA r=64's (LLaMA-2-7B width, bf16)",
            "train_step",
            lambda r: training_speed(r, molora_name(r)),
            lambda v: v >= 1.0,
        ),
        judge(
            report,
            "MoLoRA peak memory <= PEFT LoRA's + 5 % (step peak + trainable and AdamW state)",
            "train_step",
            training_memory,
            lambda v: v <= MEMORY_SLACK,
        ),
        judge(
            report,
            "own LoRA r=64 training tokens/s >= PEFT LoRA r=64's",
            "train_step",
            lambda r: training_speed(r, f"lora_r{r['experts'] * r['rank']}"),
            lambda v: v >= 1.0,
        ),
    ]
    for batch in ("1", "16"):
        found.append(
            judge(
                report,
                f"MoEI generation tokens/s within 10 % of PEFT LoRA's at batch {batch}",
                "generate",
                lambda r, b=batch: generation_speed(r, b),
                lambda v: v >= GENERATION_FLOOR,
            )
        )
    found += [
        judge(
            report,
            "tiny default, bf16 on the GPU: GI change >= -1.0 point (validation)",
            "tiny_bf16",
            lambda r: (
                r["change"]["gi"],
                f"{r['change']['gi']:+.1f} (GI {r['before']['gi']:.1f} -> {r['after']['gi']:.1f})",
            ),
            lambda v: v >= GI_CHANGE_FLOOR,
        ),
        judge(
            report,
            "tiny default, bf16 on the GPU: mean gate on GI prompts <= 0.05",
            "tiny_bf16",
            lambda r: (
                r["after"]["gate_gi"],
                f"{r['after']['gate_gi']:.3f} (on EI prompts {r['after']['gate_ei']:.3f})",
            ),
            lambda v: v <= GATE_GI_CEILING,
        ),
        judge(
            report,
            "FSDP2 on one GPU (LLaMA-2-7B width): one step, adapter-only checkpoint saved and loaded",
            "fsdp2",
            fsdp2_checks,
            lambda v: v == 1.0,
        ),
        whole_check(report),
    ]
    return found


def judge(
    report: dict[str, Any], target: str, step: str, measure: Measure, passes: Callable[[float], bool]
) -> dict[str, Any]:
    """One target's line: PASS or FAIL on the step's result, SKIP in a smoke run, FAIL without a result."""
    entry = report["steps"].get(step)
    line: dict[str, Any] = {"target": target, "step": step, "value": None}
    if entry is None or entry["status"] == "pending":
        return {**line, "verdict": "FAIL", "detail": f"step {step} has not run"}
    if "result" not in entry:
        return {
            **line,
            "verdict": "FAIL",
            "detail": f"step {step} gave no result ({entry.get('error', entry['status'])})",
        }
    try:
        value, detail = measure(entry["result"])
    except (KeyError, TypeError, ZeroDivisionError) as err:
        return {**line, "verdict": "FAIL", "detail": f"step {step}'s result lacks what this needs: {err!r}"}
    if report["smoke"]:
        return {**line, "value": value, "verdict": "SKIP", "detail": f"{detail}; a smoke run is not judged"}
    verdict = "FAIL" if value is None or not passes(value) else "PASS"
    return {**line, "value": value, "verdict": verdict, "detail": detail}


def molora_name(result: dict[str, Any]) -> str:
    return f"molora_{result['experts']}x{result['rank']}_prompt"


def training_speed(result: dict[str, Any], name: str) -> tuple[float, str]:
    """Tokens/s against PEFT's: the inverse of the paired time ratio, and its interquartile range."""
    row = result["variants"][name]
    low, high = row["paired_iqr"]
    reference = result["variants"][result["reference"]]
    detail = (
        f"{1 / row['x_paired']:.3f}x (IQR {1 / high:.3f}-{1 / low:.3f} over {result['repeats']} rounds); "
        f"{name} {row['tokens_per_s']:,.0f} tokens/s, {result['reference']} {reference['tokens_per_s']:,.0f}"
    )
    return 1 / row["x_paired"], detail


def training_memory(result: dict[str, Any]) -> tuple[float | None, str]:
    """MoLoRA's memory over PEFT's: CUDA step peak plus state; None on the CPU, which has no allocator peak."""
    name, reference = molora_name(result), result["reference"]
    rows = result["variants"]
    if rows[name]["peak_mib"] is None:
        return None, "no CUDA peak on the CPU"

    def total(row: dict[str, Any]) -> float:
        return row["peak_mib"] + row["state_mib"]

    detail = (
        f"{name} {total(rows[name]):,.0f} MiB ({rows[name]['peak_mib']:,.0f} peak + {rows[name]['state_mib']:,.1f} "
        f"state), {reference} {total(rows[reference]):,.0f} MiB"
    )
    return total(rows[name]) / total(rows[reference]), detail


def generation_speed(result: dict[str, Any], batch: str) -> tuple[float, str]:
    rows = result["batches"][batch]
    name = f"moei_{result['experts']}x{result['rank']}_prompt"
    peft = f"peft_lora_r{result['experts'] * result['rank']}"
    low, high = rows[name]["paired_iqr"]
    detail = (
        f"{rows[name]['x_peft_paired']:.3f}x (IQR {low:.3f}-{high:.3f}); {name} {rows[name]['tokens_per_s']:,.0f} "
        f"tokens/s, {peft} {rows[peft]['tokens_per_s']:,.0f}, frozen {rows['frozen']['tokens_per_s']:,.0f}"
    )
    return rows[name]["x_peft_paired"], detail


def fsdp2_checks(result: dict[str, Any]) -> tuple[float, str]:
    """1.0 when every check passed; the detail names the ones that did not."""
    checks = result["checks"]
    failed = [name for name, ok in checks.items() if not ok]
    complete = len(checks) == 3
    detail = "; ".join(f"{'ok' if ok else 'FAILED'}: {name}" for name, ok in checks.items())
    return float(complete and not failed), detail + ("" if complete else "; not every check ran")


def whole_check(report: dict[str, Any]) -> dict[str, Any]:
    """The wall time against the budget, judged only when every step ran in this one invocation."""
    target = f"the whole check within {report['total_s']:.0f} s" + (
        ", install included" if report["install_included"] else " (install not timed: no --since)"
    )
    line = {"target": target, "step": None, "value": report.get("wall_s")}
    if not report.get("finished"):
        return {**line, "verdict": "FAIL", "detail": "the check has not finished"}
    if report["only"]:
        return {**line, "verdict": "SKIP", "detail": f"--only ran {report['only']}, not the whole check"}
    detail = f"{report['wall_s']:.0f} s"
    if report["smoke"]:
        return {**line, "verdict": "SKIP", "detail": f"{detail}; a smoke run is not judged"}
    return {**line, "verdict": "PASS" if report["wall_s"] <= report["total_s"] else "FAIL", "detail": detail}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, targets, steps, each step's numbers, then what went wrong."""
    env = report["environment"]
    kind = "smoke run (CPU, tiny sizes; the targets apply to the GPU run)" if report["smoke"] else "GPU run"
    wall = f"{report['wall_s']:.0f} s" if "wall_s" in report else "not finished"
    lines = [
        f"# GPU check: {kind}",
        "",
        f"Started {report['started']}, {wall} of {report['total_s']:.0f} s"
        + (" (from before the install)" if report["install_included"] else "")
        + f". GPU: {env['gpu'] or 'none'}; CPU: {env['cpu']} x {env['cpus']}; Python {env['python']}, torch "
        f"{env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, lightning {env['lightning']}, "
        f"peft {env['peft']}; commit {env['commit']}.",
        "",
        "## Targets",
        "",
        *[f"- {t['verdict']}: {t['target']}: {t['detail']}" for t in report.get("targets") or targets(report)],
        "",
        "## Steps",
        "",
        "| step | what | status | wall s | budget s |",
        "|---|---|---|---:|---:|",
    ]
    for name, entry in report["steps"].items():
        wall_s = f"{entry['wall_s']:.0f}" if "wall_s" in entry else ""
        lines.append(f"| {name} | {entry['title']} | {entry['status']} | {wall_s} | {entry['budget_s']} |")
    for name, entry in report["steps"].items():
        if "result" in entry and name in SECTIONS:
            lines += ["", f"## {name}", "", *SECTIONS[name](entry["result"])]
    failed = {name: e for name, e in report["steps"].items() if e["status"] not in ("ok", "pending")}
    if failed:
        lines += ["", "## What went wrong"]
        for name, entry in failed.items():
            lines += ["", f"### {name}: {entry['status']}: {entry.get('error', '')}", ""]
            if entry.get("tail"):
                lines += ["```", *entry["tail"], "```"]
    return "\n".join(lines) + "\n"


def train_step_section(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['device_name']}; {result['shape']} width, {result['layers']} layers, {result['batch_size']} x "
        f"{result['seq_len']} tokens, {result['dtype']}, {result['repeats']} rounds; ratios are step times "
        f"against {result['reference']} (below 1 is faster)",
        "",
        "| variant | tokens/s | x time (paired) | paired IQR | peak MiB | state MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["variants"].items():
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:,.0f}"
        low, high = row["paired_iqr"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:,.0f} | {row['x_paired']:.3f} | {low:.3f}-{high:.3f} | {peak} | "
            f"{row['state_mib']:,.1f} |"
        )
    return lines


def scale_section(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['device_name']}; {result['shape']} width, {result['layers']} layers, {result['batch_size']} x "
        f"{result['seq_len']} tokens, K={result['experts']} r={result['rank']}",
        "",
        "| variant | act. ckpt | tokens/s | peak GiB | above resident GiB |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ckpt = "-" if row["variant"] == "frozen" else ("on" if row["checkpointing"] else "off")
        peak, above = (
            ("n/a", "n/a")
            if row["peak_gib"] is None
            else (f"{row['peak_gib']:.2f}", f"{row['above_resident_gib']:.2f}")
        )
        lines.append(f"| {row['variant']} | {ckpt} | {row['tokens_per_s']:,.0f} | {peak} | {above} |")
    return lines


def generate_section(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['device_name']}; {result['shape']} width, {result['layers']} layers, {result['dtype']}, "
        f"{result['new_tokens']} new tokens after about {result['prompt_tokens']}, {result['repeats']} rounds; "
        "x PEFT is PEFT's time over the variant's (above 1 is faster)",
        "",
        "| batch | variant | tokens/s | x PEFT (paired) | paired IQR |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, rows in result["batches"].items():
        for name, row in rows.items():
            low, high = row["paired_iqr"]
            lines.append(
                f"| {batch} | {name} | {row['tokens_per_s']:,.0f} | {row['x_peft_paired']:.3f} | {low:.3f}-{high:.3f} |"
            )
    return lines


def tiny_section(result: dict[str, Any]) -> list[str]:
    lines = [
        f"run directory {result['run_dir']}; validation split, multiple choice, %",
        "",
        "| | before | after | change |",
        "|---|---:|---:|---:|",
    ]
    for key, label, digits in (
        ("ei", "EI", 1),
        ("gi", "GI", 1),
        ("gate_ei", "gate on EI", 3),
        ("gate_gi", "gate on GI", 3),
    ):
        before, after, change = (result[when][key] for when in ("before", "after", "change"))
        lines.append(f"| {label} | {before:.{digits}f} | {after:.{digits}f} | {change:+.{digits}f} |")
    return lines


def fsdp2_section(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['device_name']}; {result['shape']} width, {result['layers']} layers, "
        f"{result['backbone_parameters']:,} backbone parameters written in {result['backbone_s']:.0f} s",
        "",
        *[f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in result["checks"].items()],
    ]
    if "checkpoint" in result:
        checkpoint = result["checkpoint"]
        lines.append(
            f"- checkpoint: {checkpoint['tensors']} adapter tensors ({checkpoint['parameters']:,} parameters), "
            f"{checkpoint['optimizer_states']} optimizer states, {checkpoint['megabytes']:.1f} MB"
        )
    times = [
        f"{label} {result[key]:.0f} s" for key, label in (("fit_s", "fit"), ("resume_s", "resume")) if key in result
    ]
    return [*lines, f"- wall: {', '.join(times)}"] if times else lines


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "train_step": train_step_section,
    "scale_7b": scale_section,
    "scale_13b": scale_section,
    "generate": generate_section,
    "tiny_bf16": tiny_section,
    "fsdp2": fsdp2_section,
}


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if len(paths) != 1:
        print("usage: python benchmarks/gpu_check_report.py OUT/gpu_check.json", file=sys.stderr)
        return 2
    report = json.loads(Path(paths[0]).read_text())
    report["targets"] = targets(report)
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
