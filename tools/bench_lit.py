#!/usr/bin/env python
"""Benchmark: what locking the image tower (LiT, ``train.image_tower``) saves, side by side.

    python tools/bench_lit.py                                  # tiny-2t, 64 pairs per step
    python tools/bench_lit.py --preset s32-2t --batch 16 --steps 2

One CPU rank, the DeepSpeed engine (ZeRO 1), the model's real training step, for three settings
of the same model: nothing locked, the image tower locked (``lock``), and locked but its last group
(pooling + head) trainable (``unlocked_groups=1``). Reported per setting, each measured in the same
run:

- trainable parameters;
- the optimizer state: the bytes of every tensor the ZeRO optimizer holds for its parameters (the
  fp32 master partitions and Adam's two moments), after the first step (Adam's state is created
  lazily); exact;
- the activation memory: the bytes the autograd graph saves for the backward (a locked tower
  saves nothing it would need for gradients it does not compute); exact;
- the median seconds per step over ``--steps`` steps after one warm-up step.

Ratios are to the unlocked model. The bytes do not depend on the machine; the time does.
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

SETTINGS = {"unlocked": None, "lock": {"init": "-"}, "lock, unlocked_groups=1": {"init": "-", "unlocked_groups": 1}}


def optimizer_bytes(engine) -> int:
    opt = engine.optimizer
    tensors = list(opt.single_partition_of_fp32_groups)
    for state in opt.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(preset: str, batch: int, lock: dict | None, steps: int) -> dict:
    from limoe_ds.config.run import ImageTowerInit
    from limoe_ds.model import build_model, lit
    from limoe_ds.train import engine as eng
    model = build_model(preset, seed=0)
    cfg = model.cfg
    lit.lock_image_tower(model, None if lock is None else ImageTowerInit(**lock))
    ds = {"train_micro_batch_size_per_gpu": batch, "train_batch_size": batch,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True}},
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    engine, _ = eng.build_engine(model, ds)
    gen = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1,
            "tokens": torch.randint(1, cfg.vocab_size, (batch, cfg.text_len), generator=gen)}
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x
    times, activations = [], 0
    torch.manual_seed(0)
    for s in range(steps + 1):
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            eng.train_step(engine, data)
        if s:
            times.append(time.perf_counter() - t0)
        activations = max(activations, saved[0])
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()), "optimizer_bytes": optimizer_bytes(engine),
            "activation_bytes": activations, "seconds": statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default="tiny-2t", help="a two-tower preset (NAME-2t, NAME-2t-dense)")
    ap.add_argument("--batch", type=int, default=64, help="pairs per step")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    from limoe_ds.config.model import get_preset
    if not get_preset(args.preset).two_tower:
        from limoe_ds.runtime.cli import fail
        return fail(f"--preset: {args.preset} has one tower; LiT locks a two-tower model's image tower (NAME-2t)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from limoe_ds.train.engine import init_distributed
    init_distributed()
    rows = {name: measure(args.preset, args.batch, lock, args.steps) for name, lock in SETTINGS.items()}
    base = rows["unlocked"]
    print(f"{args.preset}, {args.batch} pairs per step, one CPU rank (ZeRO 1, fp32), median of {args.steps} steps")
    for name, r in rows.items():
        print(f"  {name:24s} trainable {r['trainable'] / 1e6:7.2f}M of {r['total'] / 1e6:.2f}M  "
              f"optimizer state {r['optimizer_bytes'] / 2 ** 20:8.1f} MiB "
              f"({r['optimizer_bytes'] / base['optimizer_bytes']:.2f}x)  "
              f"activations {r['activation_bytes'] / 2 ** 20:7.1f} MiB "
              f"({r['activation_bytes'] / base['activation_bytes']:.2f}x)  "
              f"step {r['seconds']:6.3f} s ({r['seconds'] / base['seconds']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
