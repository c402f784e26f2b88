"""Multilingual retrieval: the same images captioned in many languages, retrieved per language.

The showcase of a pixels-only model (CLIPPO, ``model.text_input='pixels'``): it reads any script its
font draws, with no tokenizer and no vocabulary, so a caption in Greek or Japanese is as well-formed
an input as an English one; a token model maps the letters its BPE never saw to a few byte tokens.
The set (``tools/build_multilingual_eval.py``) is the Tux Paint stamps: one picture each, an English
caption and translations (``xx.utf8=...`` lines of the stamp's ``.txt``): 77 languages in 17 scripts
once untranslated and mis-encoded captions are left out.

Per language: text->image R@1/5 of that language's captions among ALL the stamp images (chance k/N,
the same gallery for every language) and image->text R@1/5 of the images it captions among its
captions (chance k/M); per script (the majority script of the language's letters, ``script_of``) the
mean over its languages; and the font's coverage of each language's characters (missing glyphs
counted, not discovered as gaps). English variants (en_GB, en_AU, ...) are reported but left out of
the per-script means, which are about the languages a model was not trained on.
Legend: N images, M captions of one language, K embedding width.
"""

from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass

import torch

from limoe_ds.data.errors import DataError
from limoe_ds.eval import metrics

LINE = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2})?(?:@[A-Za-z]+)?)\.utf8=(.*)$")
"""A translation line of a Tux Paint stamp description: ``de.utf8=Ein Murmeltier.``."""


def parse_stamp_text(text: str) -> dict[str, str]:
    """A stamp's ``.txt`` -> {language: caption}: 'en' is the first line, the others its
    ``xx.utf8=`` lines (a later line of one language replaces an earlier one; empty ones are left out;
    a first line that is itself a translation line gives no English caption)."""
    lines = text.splitlines()
    out = {}
    if lines and lines[0].strip() and LINE.match(lines[0].strip()) is None:
        out["en"] = lines[0].strip()
    for line in lines:
        m = LINE.match(line.strip())
        if m and m.group(2).strip():
            out[m.group(1)] = m.group(2).strip()
    return out


def caption_script(text: str) -> str:
    """The script most of a caption's letters are in (``render.script_of``; digits, spaces,
    punctuation and symbols left out); 'NONE' for a caption without letters."""
    from limoe_ds.data.render import script_of
    counts = collections.Counter(script_of(c) for c in text if c.isalpha())
    return counts.most_common(1)[0][0] if counts else "NONE"


def language_scripts(captions: dict[str, list[str | None]]) -> dict[str, str]:
    """{language: the script most of its captions are in}."""
    return {lang: collections.Counter(caption_script(c) for c in caps if c).most_common(1)[0][0]
            for lang, caps in captions.items() if any(caps)}


def looks_misencoded(text: str) -> bool:
    """Mojibake: a caption in which a fifth of the characters are the Latin-1 Supplement's signs
    (U+0080..U+00FF that are not letters: ´ ¸ ¢ § ¡ ¾ ...), which no language writes words with: text
    of a legacy 8-bit encoding read as Latin-1 (Tux Paint's Tamil descriptions, in TSCII, read
    '´Õ ¸¢É¢ §¸¡Æ¢'). Accented letters (Bóín Dé, Pöllö) are letters and do not count."""
    import unicodedata
    chars = [c for c in text if not c.isspace()]
    signs = sum(0x80 <= ord(c) <= 0xFF and c not in "«»¡¿" and not unicodedata.category(c).startswith("L")
                for c in chars)
    return bool(chars) and signs > 0.2 * len(chars)


def is_english(lang: str) -> bool:
    return lang == "en" or lang.startswith("en_")


@dataclass
class MultilingualSet:
    """Images with one caption per language each (None where a language has none)."""

    name: str
    images: list[str]
    """Image file paths."""
    captions: dict[str, list[str | None]]
    """{language: caption of image i or None}, 'en' first."""
    scripts: dict[str, str]

    def languages(self) -> list[str]:
        return [lang for lang, caps in self.captions.items() if any(caps)]


def load_multilingual_set(path: str) -> MultilingualSet:
    """The index ``tools/build_multilingual_eval.py`` writes (``PATH/index.json``, images beside it);
    DataError naming the fix when it is missing or malformed."""
    index = os.path.join(path, "index.json")
    if not os.path.isfile(index):
        raise DataError(f"multilingual set: {index!r} does not exist; build it with "
                        f"python tools/build_multilingual_eval.py --out {path}")
    try:
        with open(index, encoding="utf-8") as f:
            raw = json.load(f)
        images = [os.path.join(path, p) for p in raw["images"]]
        captions = {lang: list(caps) for lang, caps in raw["captions"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"multilingual set: {index!r} is not an index of tools/build_multilingual_eval.py "
                        f"({type(e).__name__}: {e}); build it again") from None
    bad = [lang for lang, caps in captions.items() if len(caps) != len(images)]
    if bad:
        raise DataError(f"multilingual set: {index!r}: languages {bad[:5]} do not have one entry per image "
                        f"({len(images)}); build it again")
    return MultilingualSet(name=raw.get("name", "multilingual"), images=images, captions=captions,
                           scripts=raw.get("scripts") or language_scripts(captions))


@torch.no_grad()
def multilingual_retrieval(model, text_encoder, mset: MultilingualSet, *, batch_size: int = 256,
                           capacity_factor=None, threads: int = 0) -> dict:
    """-> {"images": N, "skipped_images", "languages": {lang: metrics}, "scripts": {script: means}}
    on one process (every image embedded once; ``capacity_factor`` None: dropless). A language's
    metrics: captions M, script, t2i R@1/R@5 (chance 1/N, 5/N), i2t R@1/R@5 (chance 1/M, 5/M),
    the font's characters and missing glyphs (a CLIPPO model's renderer; None for a tokenizer)."""
    from limoe_ds.data.benchmarks import CaptionSet
    from limoe_ds.eval.run import embed_images, embed_texts
    gallery = CaptionSet(name=mset.name, images=mset.images, captions=[], image_of_caption=[], threads=threads)
    batches = gallery.iter_batches(image_size=model.cfg.image_size, batch_size=batch_size)
    img_NK, ids_N = embed_images(model, batches, modes={"m": capacity_factor})["m"]
    position = {int(i): n for n, i in enumerate(ids_N.tolist())}
    N = len(position)
    if N == 0:
        raise DataError(f"multilingual set {mset.name!r}: none of its {len(mset.images)} images could be read")
    renderer = getattr(text_encoder, "renderer", None)
    out: dict = {"images": N, "skipped_images": sum(gallery.skip_counts.values()), "languages": {}, "scripts": {}}
    for lang in mset.languages():
        kept = [(position[i], c) for i, c in enumerate(mset.captions[lang]) if c and i in position]
        if not kept:
            continue
        target_M = torch.tensor([n for n, _ in kept], dtype=torch.long, device=img_NK.device)
        texts = [c for _, c in kept]
        txt_MK = embed_texts(model, text_encoder, texts, batch_size=batch_size, capacity_factor=capacity_factor)
        M = len(texts)
        scores_MN = txt_MK.float() @ img_NK.float().t()
        t2i = metrics.recall_at_k(scores_MN, target_M, ks=(1, 5))
        i2t = metrics.recall_at_k(scores_MN[:, target_M].t(), torch.arange(M, device=img_NK.device), ks=(1, 5))
        row = {"captions": M, "script": mset.scripts.get(lang) or caption_script(texts[0]),
               "t2i/R@1": t2i[1], "t2i/R@5": t2i[5], "t2i/chance@1": 1 / N, "t2i/chance@5": min(1.0, 5 / N),
               "i2t/R@1": i2t[1], "i2t/R@5": i2t[5], "i2t/chance@1": 1 / M, "i2t/chance@5": min(1.0, 5 / M)}
        if renderer is not None:
            cov = renderer.coverage(texts)
            row["chars"] = sum(c["chars"] for c in cov.values())
            row["missing_glyphs"] = sum(c["missing"] for c in cov.values())
        out["languages"][lang] = row
    by_script: dict[str, list[dict]] = collections.defaultdict(list)
    for lang, row in out["languages"].items():
        if not is_english(lang):
            by_script[row["script"]].append(row)
    for script, rows in sorted(by_script.items()):
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("t2i/R@1", "t2i/R@5", "t2i/chance@1",
                                                                 "i2t/R@1", "i2t/R@5", "i2t/chance@1")}
        out["scripts"][script] = {"languages": len(rows), **mean}
        if renderer is not None:
            out["scripts"][script]["missing_glyphs"] = sum(r["missing_glyphs"] for r in rows)
            out["scripts"][script]["chars"] = sum(r["chars"] for r in rows)
    return out


def markdown(report: dict) -> str:
    """The report as two Markdown tables: per script (means over its languages), per language."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    glyphs = "missing_glyphs" in next(iter(report["languages"].values()), {})
    lines = [f"{report['images']} images ({report['skipped_images']} unreadable); R@k in %, chance beside it.", "",
             "| script | languages | t2i R@1 (chance) | t2i R@5 | i2t R@1 (chance) | i2t R@5 |"
             + (" missing glyphs |" if glyphs else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if glyphs else "")]
    for script, r in report["scripts"].items():
        lines.append(f"| {script} | {r['languages']} | {pct(r['t2i/R@1'])} ({pct(r['t2i/chance@1'])}) | "
                     f"{pct(r['t2i/R@5'])} | {pct(r['i2t/R@1'])} ({pct(r['i2t/chance@1'])}) | {pct(r['i2t/R@5'])} |"
                     + (f" {r['missing_glyphs']} of {r['chars']} |" if glyphs else ""))
    lines += ["", "| language | script | captions | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 |"
              + (" missing glyphs |" if glyphs else ""),
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if glyphs else "")]
    for lang, r in report["languages"].items():
        lines.append(f"| {lang} | {r['script']} | {r['captions']} | {pct(r['t2i/R@1'])} | {pct(r['t2i/R@5'])} | "
                     f"{pct(r['i2t/R@1'])} | {pct(r['i2t/R@5'])} |" + (f" {r['missing_glyphs']} |" if glyphs else ""))
    return "\n".join(lines) + "\n"


__all__ = ["parse_stamp_text", "caption_script", "looks_misencoded", "language_scripts", "MultilingualSet",
           "load_multilingual_set", "multilingual_retrieval", "markdown", "is_english"]
