#!/usr/bin/env python
"""Interim main job: build the tiny LIMoE, run real training steps on ONE synthetic batch, report.

This is what the README's `make train` runs until the DeepSpeed entry point (issue 4) and the
bundled dataset (issue 3) land: it builds the `tiny` preset, prints its parameter counts, takes a
few AdamW steps on one fixed batch of random pixels and random token ids (so the contrastive loss
must fall: the model memorises 32 pairs), then routes the batch in dropless evaluation mode and
prints the routing diagnostics per MoE layer and modality. It trains on no real data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.losses import contrastive_loss  # noqa: E402
from limoe_ds.model import build_model, param_counts  # noqa: E402
from limoe_ds.moe import diagnostics  # noqa: E402


def synthetic_batch(cfg, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    tokens = torch.randint(1, cfg.vocab_size, (batch_size, cfg.text_len), generator=gen)
    lengths = torch.randint(2, cfg.text_len + 1, (batch_size, 1), generator=gen)
    return images, tokens.masked_fill(torch.arange(cfg.text_len) >= lengths, cfg.pad_id)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args.preset, seed=args.seed)
    print(json.dumps({"preset": args.preset, **param_counts(model)}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    images, tokens = synthetic_batch(model.cfg, args.batch_size, args.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        out = model(images, tokens)
        contrastive = contrastive_loss(out.image_emb, out.text_emb, out.logit_scale)
        loss = contrastive + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
        losses.append(contrastive.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  contrastive {contrastive.item():.4f}  aux {loss.item() - contrastive.item():.5f}")
    step_s = (time.perf_counter() - t0) / args.steps
    model.eval()
    with torch.no_grad():
        routing = diagnostics.summarize(model(images, tokens).routing_stats)
    summary = {"steps": args.steps, "first_contrastive": losses[0], "last_contrastive": losses[-1],
               "seconds_per_step": round(step_s, 4), "routing_dropless_eval": routing}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
