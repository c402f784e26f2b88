"""Expert specialisation across a grid's training (LIMoE's claim 3): tools/analyze_experts.py on
every kept checkpoint of each sparse config's best seed, and a table of what the experts became.

    python tools/experiment.py GRID --experts

For each config whose model has MoE layers, the seed with the best headline metric (the lowest
held-out contrastive loss; a classifier's highest top-1) is taken, and each of its complete
checkpoints (``train.keep_last`` of them; several points of training) is analysed into
``OUT/experts/CONFIG-seedS/stepN/`` (report.json, the per-expert chart, patch overlays).
``OUT/experts/summary.md`` counts per checkpoint and MoE layer the experts whose kept tokens are
mostly image (image share >= 0.8), mostly text (<= 0.2), mixed, or none (dead), with the shares and
the layer's base rate (the image share of all its routed tokens: a one-tower pool holds more
patches than text tokens, so an expert at the base rate is not specialised).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from limoe_ds.experiments.spec import Experiment

IMAGE_SHARE, TEXT_SHARE = 0.8, 0.2
"""An expert is an image expert when at least 80% of its kept tokens are image patches, a text
expert at most 20%, otherwise mixed."""
ROOT = Path(__file__).resolve().parents[2]


def best_run(runs: list[dict]) -> dict | None:
    """The finished run with the best headline metric (None: no finished run reports one)."""
    scored = []
    for r in runs:
        final = r.get("final", {})
        if r.get("status") != "done":
            continue
        if "dropless/val/contrastive" in final:
            scored.append((final["dropless/val/contrastive"], r["seed"], r))
        elif "dropless/val/top1" in final:
            scored.append((-final["dropless/val/top1"], r["seed"], r))
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def kinds(shares: list[float]) -> dict[str, int]:
    """{'image': n, 'text': n, 'mixed': n, 'dead': n} of a layer's image share per expert."""
    out = {"image": 0, "text": 0, "mixed": 0, "dead": 0}
    for s in shares:
        key = ("dead" if s is None or (isinstance(s, float) and math.isnan(s)) else
               "image" if s >= IMAGE_SHARE else "text" if s <= TEXT_SHARE else "mixed")
        out[key] += 1
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (a completion marker written last), oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step*") if (p / "limoe_complete.json").is_file())


def analyze(exp: Experiment, doc: dict, *, print_fn=print) -> Path:
    """Run tools/analyze_experts.py on the kept checkpoints of each sparse config's best seed;
    write OUT/experts/summary.md. Returns its path."""
    out = exp.out / "experts"
    lines = [f"### Expert specialisation: {exp.name}", "",
             f"Image share of each expert's kept tokens (dropless validation pass); image >= {IMAGE_SHARE}, "
             f"text <= {TEXT_SHARE}, else mixed.", "",
             "| config | step | MoE layer | image / text / mixed / dead experts | image share per expert | "
             "image share of all its tokens |", "|---|---|---|---|---|---|"]
    for config in exp.configs:
        best = best_run([r for r in doc["runs"] if r["config"] == config])
        if best is None:
            continue
        run = exp.run(config, best["seed"])
        resolved = json.loads((run.run_dir / "resolved_config.json").read_text())["limoe"]["model"]
        towers = [resolved, resolved.get("text_tower") or {}]
        if not any(t.get("moe") for t in towers):
            continue  # a dense model has no experts
        for ckpt in checkpoints(run.run_dir):
            dest = out / f"{config}-seed{best['seed']}" / ckpt.name
            if not (dest / "report.json").is_file():
                r = subprocess.run([sys.executable, str(ROOT / "tools" / "analyze_experts.py"), "--checkpoint",
                                    str(ckpt), "--out", str(dest)], cwd=ROOT, capture_output=True, text=True)
                if r.returncode != 0:
                    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    print_fn(f"experts: {config} {ckpt.name}: failed: {err}")
                    continue
            report = json.loads((dest / "report.json").read_text())
            for layer, s in report["layers"].items():
                shares = s["image_share_per_expert"]
                k = kinds(shares)
                routed = {m: s[m]["routed_tokens"] for m in ("image", "text")}
                base = routed["image"] / max(1, routed["image"] + routed["text"])
                cells = ", ".join("dead" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
                                  for v in shares)
                lines.append(f"| {config} (seed {best['seed']}) | {int(ckpt.name.removeprefix('step'))} | {layer} | "
                             f"{k['image']} / {k['text']} / {k['mixed']} / {k['dead']} | {cells} | {base:.2f} |")
            print_fn(f"experts: {config} seed {best['seed']} {ckpt.name} -> {dest}")
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
