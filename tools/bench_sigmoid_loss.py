#!/usr/bin/env python
"""Benchmark: the sigmoid loss's two distributed forms side by side, on gloo CPU ranks.

    python tools/bench_sigmoid_loss.py                       # 4 ranks, B=256 per rank, K=512
    python tools/bench_sigmoid_loss.py --ranks 2 --batch 1024 --dim 768 --reps 10

Each rank holds B L2-normalised image and caption embeddings of width K (leaf tensors: the
towers are the same for both forms and not measured) and runs forward + backward of
``limoe_ds.losses.gathered_sigmoid_loss`` with ``impl=all_gather`` and ``impl=ring`` in
alternation, ``--reps`` times each. Reported per form: the median seconds of forward + backward
(slowest rank), the bytes the autograd graph saves for the backward (counted with
``torch.autograd.graph.saved_tensors_hooks``: the loss's activation memory, which on a GPU adds
to the peak), and whether the two forms agree (loss and gradients, fp32). The ratios are of the
two forms measured in the same run. On a GPU cluster the ring's hops overlap nothing here: this
measures the memory and the arithmetic, not NCCL's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

IMPLS = ("all_gather", "ring")


def _rank(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F
    from limoe_ds.losses import gathered_sigmoid_loss
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    img0 = F.normalize(torch.randn(args.batch, args.dim, generator=gen), dim=-1)
    txt0 = F.normalize(img0 + 0.5 * torch.randn(args.batch, args.dim, generator=gen), dim=-1)
    times = {i: [] for i in IMPLS}
    saved, results = {}, {}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for impl in IMPLS:
            img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
            t = torch.tensor(2.3, requires_grad=True)
            b = torch.tensor(-10.0, requires_grad=True)
            nbytes = []
            dist.barrier()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(lambda x: nbytes.append(x.numel() * x.element_size()) or x,
                                                          lambda x: x):
                loss = gathered_sigmoid_loss(img, txt, t.exp(), b, impl=impl)
            loss.backward()
            dt = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rep:
                times[impl].append(dt.item())
            saved[impl] = sum(nbytes)
            results[impl] = [loss.detach(), img.grad, txt.grad, t.grad, b.grad]
    agree = all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(results["all_gather"], results["ring"]))
    flag = torch.tensor(float(agree))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"median_s": {i: statistics.median(v) for i, v in times.items()}, "saved_bytes": saved,
                       "agree": bool(flag.item())}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256, help="per-rank batch B")
    ap.add_argument("--dim", type=int, default=512, help="embedding width K")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    from limoe_ds.runtime.launch_env import free_port
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(args.ranks, free_port(), args, out_dir), nprocs=args.ranks,
                           start_method="spawn")
        with open(os.path.join(out_dir, "result.json")) as f:
            r = json.load(f)
    print(f"{args.ranks} ranks, B={args.batch} per rank (global {args.ranks * args.batch}), K={args.dim}, "
          f"median of {args.reps}")
    for impl in IMPLS:
        print(f"  {impl:10s}  forward+backward {r['median_s'][impl] * 1e3:8.1f} ms   "
              f"saved for backward {r['saved_bytes'][impl] / 2 ** 20:8.2f} MiB")
    g, ring = r["median_s"]["all_gather"], r["median_s"]["ring"]
    print(f"  ring / all_gather: time {ring / g:.2f}x, saved memory "
          f"{r['saved_bytes']['ring'] / r['saved_bytes']['all_gather']:.3f}x; "
          f"loss and gradients agree: {r['agree']}")
    return 0 if r["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
