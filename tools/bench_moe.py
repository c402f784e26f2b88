#!/usr/bin/env python
"""Benchmark: the LIMoE MoE layer vs a dense FFN of the same per-token compute vs DeepSpeed's
stock TopKGate MoE, forward + backward, timed side by side in ONE run (interleaved round-robin,
median of repeats), and the ratios printed as a Markdown table.

    OMP_NUM_THREADS=2 python tools/bench_moe.py                    # E = 4, 8, 32; d=256; 4096 tokens
    OMP_NUM_THREADS=2 python tools/bench_moe.py --experts 8 --tokens 8192 --repeats 30

All three layers see the same tokens (3/4 image patches, 1/4 text) with capacity factor 1.0 in
training mode. Ours includes its full training cost: router noise, BPR, all LIMoE auxiliary
losses (importance, load, local and global entropy per modality) and the routing statistics.
DeepSpeed's stock layer: top-1, RTS drop policy, Switch l_aux, no noise (its defaults).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.compat.deepspeed import quiet_import  # noqa: E402
from limoe_ds.config.model import MoEConfig  # noqa: E402
from limoe_ds.moe.layer import MLP, LIMoELayer  # noqa: E402
from limoe_ds.moe.routing import TOKEN_IMAGE, TOKEN_TEXT  # noqa: E402

with quiet_import():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402


def build(d: int, mlp: int, E: int):
    dense = MLP(d, mlp)
    ours = LIMoELayer(d, mlp, MoEConfig(num_experts=E, layers=(0,), capacity_factor=1.0))
    with quiet_import():  # DeepSpeed's MoE prints its set-up
        stock = DeepSpeedMoE(d, MLP(d, mlp), num_experts=E, k=1, capacity_factor=1.0, min_capacity=4)
    return dense, ours, stock


def steps(dense, ours, stock, x, types):
    def run_dense():
        dense(x).sum().backward()

    def run_ours():
        y, routing, _ = ours(x, types)
        (y.sum() + sum(routing.aux.values())).backward()

    def run_stock():
        y, l_aux, _ = stock(x)
        (y.sum() + l_aux).backward()
    return {"dense FFN": run_dense, "LIMoE (ours)": run_ours, "DeepSpeed TopKGate": run_stock}


def time_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8, 32])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--mlp-dim", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    S = args.tokens
    x = torch.randn(S, args.width, requires_grad=True)
    types = torch.tensor([TOKEN_IMAGE] * (3 * S // 4) + [TOKEN_TEXT] * (S - 3 * S // 4))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.width}, mlp={args.mlp_dim}, "
          f"{S} tokens, cf=1.0, forward+backward, median of {args.repeats}\n")
    print("| E | dense FFN ms | LIMoE ms | DeepSpeed TopKGate ms | LIMoE / dense | DeepSpeed / dense "
          "| LIMoE / DeepSpeed |")
    print("|---|---|---|---|---|---|---|")
    for E in args.experts:
        med = time_interleaved(steps(*build(args.width, args.mlp_dim, E), x, types), args.repeats, args.warmup)
        d, o, s = med["dense FFN"], med["LIMoE (ours)"], med["DeepSpeed TopKGate"]
        print(f"| {E} | {d * 1e3:.1f} | {o * 1e3:.1f} | {s * 1e3:.1f} | {o / d:.3f} | {s / d:.3f} | {o / s:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
