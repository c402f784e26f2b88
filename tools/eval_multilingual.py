#!/usr/bin/env python
"""Multilingual retrieval of a checkpoint: the Tux Paint stamps captioned in ~77 languages, per
language and per script, with chance levels and the font's missing glyphs (limoe_ds/eval/multilingual.py).

    python tools/build_multilingual_eval.py --out data/multilingual      # once, about 10 s
    python tools/eval_multilingual.py --checkpoint runs/tiny_clippo/checkpoints/step00001800 \
        --out report.json --md table.md

One process, every expert on it (the model is rebuilt from the checkpoint's stored config and its
consolidated weights, like tools/evaluate.py), dropless routing unless ``--capacity-factor``. Works
for any contrastive checkpoint: a CLIPPO model (``model.text_input=pixels``) renders each caption
with its Unifont renderer (missing glyphs are counted per language and printed per script before
the evaluation), a token model reads it with its BPE tokenizer. The JSON report holds the command
that made it; ``--md`` writes the tables.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--data", default="data/multilingual", help="the set tools/build_multilingual_eval.py wrote")
    ap.add_argument("--capacity-factor", type=float, default=None, help="route at this capacity (default: dropless)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, help="write the JSON report here too (atomically)")
    ap.add_argument("--md", type=Path, help="write the Markdown tables here (atomically)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    try:
        cfg = checkpoint.evaluation_config(args.checkpoint, [], 1)
        if cfg.model.classifier:
            raise ValueError(f"--checkpoint: {args.checkpoint} is an image classifier (model.num_classes); "
                             f"multilingual retrieval needs a contrastive image-text model")
        state = checkpoint.consolidated_model_state(args.checkpoint)
        from limoe_ds.eval.multilingual import load_multilingual_set
        mset = load_multilingual_set(args.data)
    except ValueError as e:  # DataError, ConfigError, CheckpointError are ValueErrors
        return fail(e)
    from limoe_ds.data.render import coverage_problems, text_encoder
    from limoe_ds.eval.multilingual import markdown, multilingual_retrieval
    from limoe_ds.model import build_model
    model = build_model(cfg.model)
    model.load_state_dict(state)
    model.eval()
    encoder = text_encoder(cfg.model, cfg.tokenizer)
    renderer = getattr(encoder, "renderer", None)
    if renderer is not None:  # a script the font cannot draw is named before, not found as gaps after
        for line in coverage_problems(renderer.coverage([c for caps in mset.captions.values() for c in caps if c])):
            print(line, file=sys.stderr, flush=True)
    report = multilingual_retrieval(model, encoder, mset, batch_size=args.batch_size,
                                    capacity_factor=args.capacity_factor)
    report = {"command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]),
              "checkpoint": str(args.checkpoint),
              "step": checkpoint.read_marker(args.checkpoint, "--checkpoint")["step"],
              "model": cfg.model.name, "text_input": cfg.model.text_input,
              "routing": "dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor}",
              **report}
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        checkpoint.atomic_write_text(args.out, text + "\n")
    if args.md:
        checkpoint.atomic_write_text(args.md, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
