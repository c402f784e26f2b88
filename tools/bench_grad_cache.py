#!/usr/bin/env python
"""Benchmark: gradient caching's activation memory and time for k = 1, 2, 4 at a fixed batch.

    python tools/bench_grad_cache.py                          # tiny, 256 pairs per step, k = 1 2 4
    python tools/bench_grad_cache.py --preset s32 --batch 64 --k 1 2 4 8 --steps 3

One CPU rank, the DeepSpeed engine (ZeRO 1), the model's real training step
(``limoe_ds.train.engine.train_step``: for k > 1 gradient caching over k micro-batches of
batch/k pairs, for k = 1 the plain step). Reported per k, each measured in the same run:

- the activation memory: the bytes the autograd graph saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), per graph, the largest graph of the step (one
  graph per engine.backward; the graphs of a cached step are built and freed one after another,
  so the largest is the step's peak);
- the median seconds per step over ``--steps`` steps after one warm-up step;
- the loss of the first step, which is the same for every k up to the routing pools (each
  micro-batch routes on its own; with a dense preset, ``--preset tiny-dense``, it is the same loss).

Ratios are to k = 1. The memory is exact (not sampled), so it does not depend on the machine;
the time does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(preset: str, batch: int, k: int, steps: int) -> dict:
    from limoe_ds.model import build_model
    from limoe_ds.train import engine as eng
    cfg = build_model(preset, device="meta").cfg
    ds = {"train_micro_batch_size_per_gpu": batch // k, "gradient_accumulation_steps": k, "train_batch_size": batch,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True}},
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    engine, _ = eng.build_engine(build_model(cfg, seed=0), ds)
    gen = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1,
            "tokens": torch.randint(1, cfg.vocab_size, (batch, cfg.text_len), generator=gen)}
    graphs, live = [], [0]
    backward = engine.backward

    def counting_backward(loss, **kw):
        graphs.append(live[0])
        live[0] = 0
        return backward(loss, **kw)
    engine.backward = counting_backward

    def pack(x):
        live[0] += x.numel() * x.element_size()
        return x
    times, first = [], None
    torch.manual_seed(0)
    for s in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            r = eng.train_step(engine, data)
        if s:
            times.append(time.perf_counter() - t0)
        first = r.loss if first is None else first
    return {"peak_bytes": max(graphs), "graphs": len(graphs) // (steps + 1), "seconds": statistics.median(times),
            "loss": first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=256, help="pairs per optimizer step (fixed for every k)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    bad = [k for k in args.k if args.batch % k]
    if bad:
        from limoe_ds.runtime.cli import fail
        return fail(f"--k: {bad} do not divide --batch {args.batch}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from limoe_ds.train.engine import init_distributed
    init_distributed()
    rows = {k: measure(args.preset, args.batch, k, args.steps) for k in args.k}
    base = rows[args.k[0]]
    print(f"{args.preset}, {args.batch} pairs per step, one CPU rank, median of {args.steps} steps")
    for k, r in rows.items():
        print(f"  k={k}: micro-batch {args.batch // k:4d}  activation memory {r['peak_bytes'] / 2 ** 20:8.1f} MiB "
              f"({r['peak_bytes'] / base['peak_bytes']:.2f}x)  step {r['seconds']:6.2f} s "
              f"({r['seconds'] / base['seconds']:.2f}x)  first loss {r['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
