#!/usr/bin/env python
"""Train the caption tokenizer (lower-cased byte-level BPE, <pad> = 0, </s> = 1) -> tokenizer.json.

    python tools/train_tokenizer.py --out runs/tok/tokenizer.json --vocab-size 32000 'shards/*.tar'
    python tools/train_tokenizer.py --out tok.json --vocab-size 4096 captions.txt more_captions.jsonl

Inputs: WebDataset tars (the caption of each sample: KEY.txt or the --caption-key field of KEY.json),
.txt files (one caption per line), .jsonl files (the --caption-key field of each line). Globs and
brace ranges are expanded. Unreadable captions are skipped and counted, as in the loader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from limoe_ds.runtime.cli import fail  # noqa: E402
from limoe_ds.config.data import SourceConfig  # noqa: E402
from limoe_ds.data.errors import DataError, SkipSample  # noqa: E402
from limoe_ds.data.samples import check_caption  # noqa: E402
from limoe_ds.data.sources import resolve_source, read_shard  # noqa: E402
from limoe_ds.data.tokenizer import Tokenizer, train_bpe  # noqa: E402


def tar_captions(path: str, caption_key: str, skipped: dict[str, int]) -> Iterator[str]:
    src = resolve_source(SourceConfig(path=path, format="webdataset"), 0, "input", caption_key, "image")
    for rec in read_shard(src, path, 0, lambda i: True, count_failure=True):
        try:
            if rec.problem in ("malformed_json", "duplicate_key", "unreadable_shard"):
                raise SkipSample(rec.problem)
            yield check_caption(rec.caption, 10_000)[0]
        except SkipSample as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1


def line_captions(path: str, caption_key: str, skipped: dict[str, int]) -> Iterator[str]:
    with open(path, "rb") as f:
        for raw in f:
            try:
                if path.endswith(".jsonl"):
                    raw = raw.strip()
                    if not raw:
                        continue
                    try:
                        raw = json.loads(raw).get(caption_key)
                    except (ValueError, AttributeError):
                        raise SkipSample("malformed_json") from None
                yield check_caption(raw, 10_000)[0]
            except SkipSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1


def iter_captions(paths: list[str], caption_key: str, skipped: dict[str, int]) -> Iterator[str]:
    src = resolve_source(SourceConfig(path=paths, format="webdataset"), 0, "inputs", caption_key, "image")
    for path in src.shards:
        reader = tar_captions if path.endswith((".tar", ".tar.gz", ".tgz")) else line_captions
        yield from reader(path, caption_key, skipped)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="tar shards, .txt or .jsonl caption files (globs allowed)")
    ap.add_argument("--out", required=True, help="where to write tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=32000, help="32000 for the GPU presets, <= 4096 for tiny")
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--caption-key", default="caption")
    args = ap.parse_args(argv)
    skipped: dict[str, int] = {}
    try:
        captions = list(iter_captions(args.inputs, args.caption_key, skipped))
    except DataError as e:
        return fail(e)
    if not captions:
        return fail(f"no usable caption in {args.inputs} (skipped: {skipped})")
    tok = train_bpe(captions, args.vocab_size, args.min_frequency)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    vocab = Tokenizer.from_file(args.out).vocab_size
    print(f"wrote {args.out}: vocab {vocab} from {len(captions)} captions (skipped: {skipped or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
