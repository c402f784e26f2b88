#!/usr/bin/env python3
"""Build data/multilingual: the multilingual retrieval set (limoe_ds/eval/multilingual.py).

Reads the Tux Paint stamps (Debian's ``tuxpaint-stamps-default``, installed by
tools/build_mini_dataset.py's package step): every PNG stamp with a description ``.txt``, whose first
line is its English caption and whose ``xx.utf8=...`` lines translate it into ~65 languages. Writes

    images/NNNNN.png   each stamp as the training sets hold it: at most 64 px on the longer side,
                       alpha kept (tools/build_mini_dataset.to_png, the pixels data/mix trains on)
    index.json         {"images": [...], "captions": {lang: [caption or null per image]},
                        "scripts": {lang: majority script}, "origins": [...], "source", "languages",
                        "untranslated_dropped": {lang: captions equal to the English one, left out},
                        "misencoded_dropped": {lang: its mojibake captions (multilingual.looks_misencoded),
                                               a language left out when they are most of its captions}}

into a temporary folder renamed into place at the end. The English captions of these stamps are in
data/mix's training set (source clipart); the translations are in no training set. About 10 s.

    python tools/build_multilingual_eval.py --out data/multilingual
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from build_mini_dataset import TUXPAINT, to_png  # noqa: E402

from limoe_ds.eval.multilingual import language_scripts, looks_misencoded, parse_stamp_text  # noqa: E402


def build(out: str, *, stamps: str = TUXPAINT, max_side: int = 64) -> dict:
    if not os.path.isdir(stamps):
        raise SystemExit(f"error: {stamps} is missing: apt-get install tuxpaint-stamps-default (Debian)")
    found = []
    for path in sorted(glob.glob(f"{stamps}/**/*.png", recursive=True)):
        txt = path[:-4] + ".txt"
        if not os.path.exists(txt):
            continue  # a _mirror / _flip variant, or a stamp without a description
        with open(txt, encoding="utf-8", errors="replace") as f:
            captions = parse_stamp_text(f.read())
        if "en" in captions:
            found.append((path, captions))
    if not found:
        raise SystemExit(f"error: no PNG stamp with a description under {stamps}")
    langs = ["en"] + sorted({lang for _, caps in found for lang in caps} - {"en"})
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "images"))
    images, origins = [], []
    for i, (path, _) in enumerate(found):
        rel = f"images/{i:05d}.png"
        with open(os.path.join(tmp, rel), "wb") as f:
            f.write(to_png((path, max_side)))
        images.append(rel)
        origins.append(os.path.relpath(path, stamps))
    # a "translation" that is the English caption again (untranslated) tests English, not the language
    same = lambda caps, lang: lang != "en" and caps.get(lang, "").casefold() == caps["en"].casefold()  # noqa: E731
    captions = {lang: [None if same(caps, lang) else caps.get(lang) for _, caps in found] for lang in langs}
    untranslated = {lang: n for lang in langs if (n := sum(same(caps, lang) for _, caps in found))}
    # a language most of whose captions are mojibake (Tux Paint's Tamil, TSCII read as Latin-1) is left out
    misencoded = {lang: n for lang, caps in captions.items()
                  if (n := sum(bool(c) and looks_misencoded(c) for c in caps)) > sum(bool(c) for c in caps) / 2}
    captions = {lang: caps for lang, caps in captions.items() if lang not in misencoded}
    captions = {lang: caps for lang, caps in captions.items() if any(caps)}
    index = {"name": "tuxpaint", "source": f"Debian tuxpaint-stamps-default ({stamps}), GPL-2.0",
             "builder": "tools/build_multilingual_eval.py", "max_side": max_side, "images": images,
             "origins": origins,
             "languages": {lang: sum(c is not None for c in caps) for lang, caps in captions.items()},
             "untranslated_dropped": untranslated, "misencoded_dropped": misencoded,
             "scripts": language_scripts(captions), "captions": captions}
    with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return index


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/multilingual")
    ap.add_argument("--stamps", default=TUXPAINT, help="the Tux Paint stamps folder")
    args = ap.parse_args(argv)
    index = build(args.out, stamps=args.stamps)
    scripts = sorted(set(index["scripts"].values()))
    print(f"wrote {args.out}: {len(index['images'])} stamps, {len(index['languages'])} languages, "
          f"{len(scripts)} scripts ({', '.join(scripts)})")


if __name__ == "__main__":
    main()
