#!/usr/bin/env python
"""Benchmark: training-loader throughput on the bundled data vs. the tiny model's consumption.

    python tools/bench_loader.py                     # data/mini, 32 x 32, text_len 16, batch 64
    python tools/bench_loader.py --workers 0 2 --batches 50 --no-model
    python tools/bench_loader.py --config ds_configs/tiny_mix.json   # the main job's mix, sources by weight
    python tools/bench_loader.py --config ds_configs/tiny_mix.json --set model.preset=tiny-clippo tokenizer=null
                                                     # CLIPPO: captions rendered in the workers

Prints samples/s of ``build_train_loader`` with 0, 1 and 2 workers (the first batch, which pays for
worker start-up and the first shuffle block, is timed apart), then, when ``limoe_ds.model`` can build
the tiny preset (with ``--config``, the config's model: a CLIPPO model's loader renders its
captions, a classifier's reads labels), the samples/s of its training step (forward, the model's
loss + aux losses, backward, AdamW step) and the ratio loader-rate / consumption-rate: above 1
the loader keeps up.
Rates are the best of three timed runs (the machine is shared with other work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.data import DataConfig, Tokenizer, build_train_loader  # noqa: E402


SETS: list[str] = []
"""--set overrides of the --config run config."""


def data_config(data: str, config: str | None, workers: int):
    """-> (data section, caption encoder, model config): the bundled set's train shards with its
    tokenizer and the tiny preset, or (``--config``) a run config's (its tokenizer, its CLIPPO
    renderer or its classifier's labels: ``data.render.text_encoder``)."""
    from limoe_ds.config.model import get_preset
    if config is None:
        return (DataConfig(train=[os.path.join(data, "train", "*.tar")], num_workers=workers, shuffle_buffer=1000),
                Tokenizer.from_file(os.path.join(data, "tokenizer.json")), get_preset("tiny"))
    from limoe_ds.config import run as run_config
    from limoe_ds.data.render import text_encoder
    cfg = run_config.load(config, [*SETS, f"data.num_workers={workers}", "parallel.expert_parallel_size=1"],
                          world_size=1)
    return cfg.data, text_encoder(cfg.model, cfg.tokenizer), cfg.model


def loader_rate(data: str, config: str | None, workers: int, batches: int, batch_size: int, image_size: int,
                text_len: int) -> tuple[float, float]:
    """-> (seconds to the first batch, samples/s over the next ``batches`` batches)."""
    cfg, tok, _ = data_config(data, config, workers)
    loader = build_train_loader(cfg, image_size=image_size, tokenizer=tok, text_len=text_len,
                                batch_size=batch_size, dp_rank=0, dp_size=1)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    return first, best_rate(lambda: next(it), batches, batch_size)


def best_rate(fn, calls: int, batch_size: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``calls`` calls, in samples/s: the machine is shared, and the
    best run is the one least disturbed by other work."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(calls * batch_size / (time.perf_counter() - t0))
    return max(rates)


def model_rate(data: str, config: str | None, steps: int, batch_size: int, image_size: int,
               text_len: int) -> float | None:
    """Samples/s of the model's training step (tiny, or the --config's), or None if it cannot be built."""
    from limoe_ds.losses import classification_loss, pair_loss
    from limoe_ds.model import build_model
    cfg, tok, model_cfg = data_config(data, config, 0)
    try:
        model = build_model(model_cfg)
    except Exception as e:  # the model is another engineer's work in progress
        print(f"model step: not timed ({type(e).__name__}: {e})")
        return None
    batch = next(iter(build_train_loader(cfg, image_size=image_size, tokenizer=tok, text_len=text_len,
                                         batch_size=batch_size, dp_rank=0, dp_size=1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        if "labels" in batch:
            out = model(batch["images"], None)
            loss = classification_loss(out.logits, batch["labels"])
        else:
            out = model(batch["images"], batch["tokens"])
            loss = pair_loss(out, group=False)
        loss = loss + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    return best_rate(step, steps, batch_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "data", "mini"))
    ap.add_argument("--config", default=None, help="read a run config's data section instead of --data")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the --config")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=20, help="batches per timed run (3 runs)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32, help="the tiny preset's resolution (--config: its model's)")
    ap.add_argument("--text-len", type=int, default=16, help="(--config: its model's)")
    ap.add_argument("--steps", type=int, default=10, help="timed model steps")
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args(argv)
    SETS[:] = args.set
    if args.config is not None:  # the config's model sets the resolution and the caption length
        model_cfg = data_config(args.data, args.config, 0)[2]
        args.image_size, args.text_len = model_cfg.image_size, model_cfg.text_len
    if args.config is None and not os.path.isfile(os.path.join(args.data, "manifest.json")):
        return fail(f"no dataset at {args.data}; build it with: python tools/build_mini_dataset.py --out {args.data}")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, text_len {args.text_len}")
    rates = {}
    for w in args.workers:
        first, rates[w] = loader_rate(args.data, args.config, w, args.batches, args.batch_size, args.image_size,
                                      args.text_len)
        print(f"loader  workers={w}: {rates[w]:8.0f} samples/s  (first batch after {first:.2f} s)")
    consume = None if args.no_model else model_rate(args.data, args.config, args.steps, args.batch_size,
                                                    args.image_size, args.text_len)
    if consume:
        print(f"model   tiny train step (fwd+bwd+AdamW): {consume:8.0f} samples/s")
        for w, r in rates.items():
            print(f"ratio   workers={w}: loader/consumption = {r / consume:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
