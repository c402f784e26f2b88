"""The grid's figures (matplotlib, object API and the Agg canvas), from results.json's document.

- ``curves.png``: training loss per log window and the held-out metric at each evaluation, per
  config: the mean over seeds (line) and its range (band), against training steps.
- ``final.png``: each table metric per config: the mean (bar), +- one standard deviation (error
  bar) and every seed (dots).
- ``routing.png``: routing success per modality over training (the mean over MoE layers and
  seeds), one panel per modality; configs without MoE layers are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from limoe_ds.eval.figures import PALETTE, _figure, _rgb

DPI = 100


def _colour(i: int):
    return _rgb(PALETTE[i % len(PALETTE)])


def _series(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values [seeds, steps]) of ``key`` over the runs that logged it at the same steps."""
    curves = [r["curves"][key] for r in runs if key in r.get("curves", {})]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not steps:
        return None
    values = np.array([[dict((s, v) for s, v in c)[s] for s in steps] for c in curves], dtype=float)
    return np.array(steps), values


def _routing(runs: list[dict], modality: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, success [seeds, steps]): the mean over MoE layers of routing/L/<modality>/success_rate."""
    per_run = []
    for r in runs:
        keys = [k for k in r.get("curves", {}) if k.startswith("routing/") and k.endswith(f"/{modality}/success_rate")]
        if keys:
            s = _series([r], keys[0])
            if s is not None:
                per_run.append((s[0], np.mean([_series([r], k)[1][0] for k in keys], axis=0)))
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in per_run)))
    return np.array(steps), np.array([[dict(zip(s.tolist(), v))[t] for t in steps] for s, v in per_run])


def _held_out_key(doc: dict) -> tuple[str, str]:
    runs = [r for r in doc["runs"] if r["status"] == "done"]
    if any(r.get("task") == "classifier" for r in runs):
        return "dropless/val/top1", "held-out top-1 (dropless)"
    return "dropless/val/contrastive", "held-out contrastive loss (dropless)"


def curves(doc: dict):
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2)
    held_key, held_label = _held_out_key(doc)
    train_key = "loss/xent" if held_key.endswith("top1") else "loss/contrastive"
    for i, c in enumerate(doc["configs"]):
        runs = [r for r in doc["runs"] if r["config"] == c and r["status"] == "done"]
        for ax, key in zip(axes, (train_key, held_key)):
            s = _series(runs, key)
            if s is None:
                continue
            steps, v = s
            ax.plot(steps, v.mean(0), color=_colour(i), label=f"{c} (n={len(v)})",
                    marker="o" if len(steps) < 8 else None)
            if len(v) > 1:
                ax.fill_between(steps, v.min(0), v.max(0), color=_colour(i), alpha=0.2, linewidth=0)
    axes[0].set(title=f"Training loss ({train_key}, per log window)", xlabel="training step", ylabel="loss (nats)")
    axes[1].set(title=held_label.capitalize(), xlabel="training step",
                ylabel="top-1 accuracy" if held_key.endswith("top1") else "loss (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{doc['experiment']}: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    return fig


def final(doc: dict):
    metrics = doc["metrics"]
    fig = _figure(max(4.0, 3.2 * len(metrics)), 3.4)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics))))
    for ax, m in zip(axes, metrics):
        names, means, stds = [], [], []
        for i, c in enumerate(doc["configs"]):
            cell = doc["table"][c].get(m)
            if cell is None:
                continue
            names.append(c)
            means.append(cell["mean"])
            stds.append(cell["std"])
            ax.scatter([len(names) - 1] * len(cell["values"]), cell["values"], color="black", s=10, zorder=3)
        x = np.arange(len(names))
        ax.bar(x, means, yerr=stds, capsize=4, color=[_colour(doc["configs"].index(n)) for n in names], alpha=0.85)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{doc['experiment']}: final evaluation, mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def routing(doc: dict):
    fig = _figure(10, 3.4)
    axes = fig.subplots(1, 2)
    drawn = False
    for ax, m in zip(axes, ("image", "text")):
        for i, c in enumerate(doc["configs"]):
            s = _routing([r for r in doc["runs"] if r["config"] == c and r["status"] == "done"], m)
            if s is None:
                continue
            steps, v = s
            ax.plot(steps, 100 * v.mean(0), color=_colour(i), label=c)
            drawn = True
        ax.set(title=f"Routing success, {m} tokens (mean over MoE layers)", xlabel="training step",
               ylabel="tokens kept by their expert (%)", ylim=(0, 102))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig if drawn else None


def write_all(doc: dict, out: Path) -> list[Path]:
    """curves.png, final.png, routing.png (when a config routes) in ``out``."""
    made = []
    for name, make in (("curves.png", curves), ("final.png", final), ("routing.png", routing)):
        fig = make(doc)
        if fig is None:
            continue
        path = Path(out) / name
        tmp = path.with_name(f".{name}.tmp")
        fig.savefig(tmp, format="png", dpi=DPI)
        tmp.replace(path)
        made.append(path)
    return made
