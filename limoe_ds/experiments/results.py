"""What the grid's runs measured: one result per finished run, the table over seeds, results.json.

A run's result (``collect``) is read from its run_dir after it exits 0: the final evaluation (every
evaluation key of its last evaluation step: ``dropless/val/contrastive``, ``dropless/zeroshot/...``,
``dropless/val/top1``, ...), the curves (training loss and routing per log window, each evaluation
key per evaluation), the steps, samples and training FLOPs (``limoe_ds.model.flops_per_sample`` x
samples seen). Nothing timed goes in (throughput, wall clock): an interrupted and resumed grid
gives the same results.json as an uninterrupted one, byte for byte (the runs resume bitwise).
Timing is the runner's progress output and ``timing.json``.

The table (``aggregate``): per config and metric the mean, the sample standard deviation (n - 1 in
the denominator; 0 for one seed) and n over the seeds that finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TRAIN_PREFIXES = ("loss/", "aux/", "routing/", "train/", "data/", "memory/", "alarm/")
"""Training-row keys; every other key of metrics.jsonl is an evaluation key (``<mode>/...``)."""
CURVE_PREFIXES = ("loss/",)
ROUTING_CURVES = ("/success_rate", "/dropped_tokens")
HEADLINE = {
    "contrastive": ["dropless/val/contrastive", "dropless/retrieval/i2t/R@1", "dropless/retrieval/t2i/R@1",
                    "dropless/zeroshot/fashion_mnist/top1", "dropless/zeroshot/heldout_objects/top1"],
    "classifier": ["dropless/val/top1", "dropless/val/xent", "train_cf/val/top1"],
}
"""The table's default columns per task (those a run does not report are left out)."""


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step, rows of one step merged; a step logged twice (the steps after the last
    checkpoint of a run killed without a stop, trained again on resume) keeps its last values."""
    by_step: dict[int, dict[str, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        step = row.pop("step", None)
        if isinstance(step, int):
            by_step.setdefault(step, {}).update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return dict(sorted(by_step.items()))


def is_eval_key(key: str) -> bool:
    return not key.startswith(TRAIN_PREFIXES)


def collect(run_dir: Path, *, flops_per_sample: int | None = None) -> dict[str, Any]:
    """The result of a finished run (see the module docstring)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    steps = int(resolved["limoe"]["train"]["steps"])
    batch = int(resolved["train_batch_size"])
    evals = [s for s, r in rows.items() if any(is_eval_key(k) for k in r)]
    final = {k: v for k, v in rows[evals[-1]].items() if is_eval_key(k)} if evals else {}
    curves: dict[str, list[list[float]]] = {}
    for step, row in rows.items():
        for k, v in row.items():
            if is_eval_key(k) or k.startswith(CURVE_PREFIXES) or (k.startswith("routing/") and
                                                                  k.endswith(ROUTING_CURVES)):
                curves.setdefault(k, []).append([step, v])
    classifier = resolved["limoe"]["model"].get("num_classes") is not None
    out = {"steps": steps, "samples": steps * batch, "task": "classifier" if classifier else "contrastive",
           "eval_step": evals[-1] if evals else None, "final": final, "curves": curves}
    if flops_per_sample is not None:
        out["flops_per_sample"] = int(flops_per_sample)
        out["train_flops"] = int(flops_per_sample) * steps * batch
    return out


def train_flops_per_sample(run_dir: Path) -> int:
    """Training FLOPs per sample of the run's model (built on the meta device from its resolved config)."""
    from limoe_ds.config.run import model_config
    from limoe_ds.model import build_model, flops_per_sample
    resolved = json.loads((Path(run_dir) / "resolved_config.json").read_text())
    return flops_per_sample(build_model(model_config(resolved["limoe"]["model"]), device="meta"))["train"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1; 0.0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def default_metrics(results: list[dict]) -> list[str]:
    """HEADLINE metrics of the runs' task that some run reports."""
    tasks = {r["task"] for r in results if r.get("status") == "done"}
    want = [m for t in ("contrastive", "classifier") if t in tasks for m in HEADLINE[t]]
    have = {k for r in results if r.get("status") == "done" for k in r["final"]}
    return [m for m in want if m in have]


def aggregate(results: list[dict], configs: list[str], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """{config: {metric: {mean, std, n, values}, 'train_flops': {...}, 'failed': n}} over the seeds
    that finished; a metric no finished seed reports is absent."""
    table: dict[str, dict[str, Any]] = {}
    for c in configs:
        done = [r for r in results if r["config"] == c and r.get("status") == "done"]
        row: dict[str, Any] = {"failed": sum(r["config"] == c and r.get("status") == "failed" for r in results),
                               "seeds": [r["seed"] for r in done]}
        for m in [*metrics, "train_flops"]:
            values = [r["final"][m] if m in r["final"] else r.get(m) for r in done]
            values = [v for v in values if v is not None]
            if values:
                mean, std = mean_std(values)
                row[m] = {"mean": mean, "std": std, "n": len(values), "values": values}
        table[c] = row
    return table


def _fmt(value: float, metric: str) -> str:
    if metric == "train_flops":
        return f"{value:.3g}"
    if "top1" in metric or "top5" in metric or "R@" in metric or "success" in metric:
        return f"{100 * value:.2f}%"
    return f"{value:.4f}"


def markdown(table: dict[str, dict[str, Any]], metrics: list[str], *, title: str = "") -> str:
    """The table as Markdown: one row per config, 'mean +- std (n)' per metric, training FLOPs."""
    cols = [*metrics, "train_flops"]
    lines = [f"### {title}", ""] if title else []
    lines.append("| config | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for c, row in table.items():
        cells = []
        for m in cols:
            v = row.get(m)
            if v is None:
                cells.append("")
            elif m == "train_flops" or v["n"] == 1:
                cells.append(f"{_fmt(v['mean'], m)} (n={v['n']})")
            else:
                cells.append(f"{_fmt(v['mean'], m)} ± {_fmt(v['std'], m).rstrip('%')} (n={v['n']})")
        failed = f" ({row['failed']} failed)" if row.get("failed") else ""
        lines.append(f"| {c}{failed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(a: dict[str, Any], b: dict[str, Any], *, higher_is_better: bool) -> str:
    """Config a against config b on one metric ({mean, std, n} each): 'holds' when a is better by
    more than twice the larger standard deviation over seeds, 'does not hold' when b is better by
    that much, else 'not distinguishable from seed noise'. Needs n >= 2 on both sides."""
    if min(a["n"], b["n"]) < 2:
        return "not distinguishable from seed noise (fewer than 2 seeds)"
    diff = (a["mean"] - b["mean"]) * (1 if higher_is_better else -1)
    margin = 2 * max(a["std"], b["std"])
    if diff > margin:
        return "holds"
    if -diff > margin:
        return "does not hold"
    return "not distinguishable from seed noise"
