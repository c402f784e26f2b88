#!/usr/bin/env python
"""Evaluate a checkpoint: held-out loss, retrieval R@1/5/10, zero-shot (seen / unseen classes),
each dropless and at the training capacity factor; one JSON report with the command that made it.

    python tools/evaluate.py --checkpoint runs/tiny/checkpoints/step00000500 [--out report.json]
    deepspeed --num_gpus 8 tools/evaluate.py --checkpoint runs/b16/checkpoints/step00100000 \
        --set data.val=/data/coco-val eval.zero_shot=[/data/imagenet-zs]

The model is rebuilt from the configuration stored in the checkpoint, with every expert on every
rank (no expert parallelism, so any number of ranks works); ranks split the data. The files it
reads (marker, model states, experts) are checked against the checksums recorded at save first: a
damaged one is one ``error:`` line naming it, exit status 2. ``--set``
overrides that configuration (e.g. other evaluation data).

Standard benchmarks from your own copies, ``--data KIND=PATH[,KEY=VALUE...]`` (repeatable):

    --data imagenet=/data/imagenet/val,classnames=/data/imagenet/classnames.txt[,templates=FILE]
    --data coco=/data/coco/dataset_coco.json,images=/data/coco[,split=test]
    --data flickr30k=/data/flickr30k/dataset_flickr30k.json,images=/data/flickr30k/images

``imagenet`` (or ``classes``): a class-folder tree (sorted folder names = label ids) with one class
name per line in that order; templates default to the 80 CLIP ones when open_clip is installed.
``coco`` / ``flickr30k`` (or ``karpathy``): Karpathy-split JSON, images at IMAGES/filepath/filename,
several captions per image. Any kind takes ``name=`` (report key). Report keys:
MODE/zeroshot/NAME/... and MODE/retrieval/NAME/... (limoe_ds/data/benchmarks.py); with
``--set eval.compositional=[synthetic:scenes]`` the compositional evaluation on held-out attribute
combinations, drawn on the fly, MODE/compositional/scenes/... (docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.checkpoint import io as checkpoint  # noqa: E402
from limoe_ds.runtime.launch_env import world_from_env  # noqa: E402


def _benchmarks(specs: list[str], threads: int) -> list:
    from limoe_ds.data.benchmarks import load_benchmark
    sets = [load_benchmark(spec, threads=threads) for spec in specs]
    names = [s.name for s in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--data: two benchmarks are named {dup!r}; give one of them name=OTHER")
    return sets


def _evaluate(cfg, state, benchmarks: list, rank: int, world: int) -> dict[str, float]:
    from limoe_ds.data import build_eval_loader
    from limoe_ds.data.render import text_encoder
    from limoe_ds.data.benchmarks import CaptionSet
    from limoe_ds.data.synthetic import compositional_set
    from limoe_ds.data.zeroshot import load_zeroshot_set
    from limoe_ds.train.engine import init_distributed
    from limoe_ds.eval.run import evaluate
    from limoe_ds.model import build_model
    init_distributed()
    model = build_model(cfg.model)
    model.load_state_dict(state)
    tok = text_encoder(cfg.model, cfg.tokenizer)
    val = None
    if cfg.data.val is not None:
        val = build_eval_loader(cfg.data, image_size=cfg.model.image_size, tokenizer=tok, text_len=cfg.model.text_len,
                                batch_size=cfg.eval.batch_size, dp_rank=rank, dp_size=world)
    zero_shot = [load_zeroshot_set(z) for z in cfg.eval.zero_shot] + [b for b in benchmarks
                                                                      if not isinstance(b, CaptionSet)]
    return evaluate(model, val_loader=val, zero_shot_sets=zero_shot,
                    retrieval_sets=[b for b in benchmarks if isinstance(b, CaptionSet)],
                    compositional_sets=[compositional_set(c, cfg.eval.compositional_scenes)
                                        for c in cfg.eval.compositional], tokenizer=tok,
                    dp_rank=rank, dp_size=world, max_batches=cfg.eval.max_batches,
                    zero_shot_max_images=cfg.eval.zero_shot_max_images)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", action="append", default=[], metavar="KIND=PATH[,KEY=VALUE...]",
                    help="a standard benchmark from your own copy (repeatable; see above)")
    ap.add_argument("--out", type=Path, help="write the JSON report here too (atomically)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    rank, world = world_from_env()
    try:
        cfg = checkpoint.evaluation_config(args.checkpoint, args.set, world)
        state = checkpoint.consolidated_model_state(args.checkpoint)
        benchmarks = _benchmarks(args.data, threads=cfg.data.num_workers)
    except ValueError as e:  # DataError and ConfigError are ValueErrors
        return fail(e)
    results = _evaluate(cfg, state, benchmarks, rank, world)
    command = shlex.join([sys.executable, str(Path(__file__).resolve()), *argv])  # reproduces this report
    report = {"command": command, "checkpoint": str(args.checkpoint),
              "step": checkpoint.read_marker(args.checkpoint, "--checkpoint")["step"], "ranks": world,
              "metrics": results}
    if rank == 0:
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            checkpoint.atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
