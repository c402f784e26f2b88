"""Multilingual retrieval (limoe_ds/eval/multilingual.py, tools/build_multilingual_eval.py and
tools/eval_multilingual.py): stamp descriptions parsed, untranslated and mis-encoded captions left
out, one gallery of images for every language, chance levels, missing glyphs counted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from limoe_ds.data.errors import DataError
from limoe_ds.eval.multilingual import (caption_script, load_multilingual_set, looks_misencoded, markdown,
                                        multilingual_retrieval, parse_stamp_text)
from limoe_ds.model import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

STAMPS = {  # a fake Tux Paint tree: category/name.png + name.txt
    "animals/frog": "A frog.\nde.utf8=Ein Frosch.\nel.utf8=Ένας βάτραχος.\nja.utf8=カエル\nen_GB.utf8=A frog.\n"
                    "ta.utf8=´Õ ¾ÅÇ¢\ngot.utf8=𐌰𐌹𐌽𐍃",
    "food/apple": "An apple.\nde.utf8=Ein Apfel.\nel.utf8=Ένα μήλο.\nja.utf8=りんご\nen_GB.utf8=An apple.\n"
                  "ta.utf8=´Õ ¬ôÀ¢û",
    "food/bread": "A loaf of bread.\nde.utf8=Ein Brot.\nja.utf8=パン\nen_GB.utf8=A loaf of bread.\nta.utf8=ÃõÀõ.\n"
                  "de.utf8=Ein Laib Brot.",  # a later line of a language replaces the earlier one
    "food/mirror_only_mirror": None,  # a PNG without a description: not a stamp
}


def make_stamps(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, text in STAMPS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 120, 4), dtype=np.uint8), "RGBA").save(root / f"{name}.png")
        if text is not None:
            (root / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return root


@pytest.fixture
def mset_dir(tmp_path):
    import build_multilingual_eval
    index = build_multilingual_eval.build(str(tmp_path / "ml"), stamps=str(make_stamps(tmp_path / "stamps")))
    return tmp_path / "ml", index


def test_a_stamp_description_is_english_then_its_translations():
    got = parse_stamp_text("A marmot.\nde.utf8=Ein Murmeltier.\nca@valencia.utf8=Una marmota.\npt_BR.utf8=\n"
                           "not a translation line\nsr@latin.utf8=Svizac.")
    assert got == {"en": "A marmot.", "de": "Ein Murmeltier.", "ca@valencia": "Una marmota.", "sr@latin": "Svizac."}
    assert parse_stamp_text("") == {} and parse_stamp_text("de.utf8=Nur Deutsch.") == {"de": "Nur Deutsch."}


def test_scripts_and_mojibake():
    assert [caption_script(t) for t in ("Ένας βάτραχος (frog).", "カエル", "Ein Frosch", "42 !")] == [
        "GREEK", "KATAKANA", "LATIN", "NONE"]
    assert looks_misencoded("´Õ ¸¢É¢ §¸¡Æ¢")  # TSCII Tamil read as Latin-1
    for fine in ("Bóín Dé.", "Pöllö.", "«Flecha».", "¡¡¡Boom!!!", "Ein Frosch.", "カエル"):
        assert not looks_misencoded(fine), fine


def test_the_builder_keeps_the_stamps_and_leaves_out_what_tests_no_language(mset_dir):
    path, index = mset_dir
    assert index["origins"] == ["animals/frog.png", "food/apple.png", "food/bread.png"]
    assert [Image.open(path / p).size for p in index["images"]] == [(64, 43)] * 3  # as data/mix holds them
    # ta: 2 of its 3 captions look mis-encoded ('ÃõÀõ.' is letters): most of them, so all of ta goes
    assert index["untranslated_dropped"] == {"en_GB": 3} and index["misencoded_dropped"] == {"ta": 2}
    assert list(index["captions"]) == ["en", "de", "el", "got", "ja"]  # en_GB and ta left out entirely
    assert index["captions"]["el"] == ["Ένας βάτραχος.", "Ένα μήλο.", None]
    assert index["captions"]["de"][2] == "Ein Laib Brot."
    assert index["scripts"] == {"en": "LATIN", "de": "LATIN", "el": "GREEK", "got": "GOTHIC", "ja": "KATAKANA"}
    mset = load_multilingual_set(str(path))
    assert mset.languages() == ["en", "de", "el", "got", "ja"] and mset.images[0] == str(path / "images/00000.png")


def test_a_missing_or_malformed_index_is_one_line(tmp_path, mset_dir):
    with pytest.raises(DataError, match="does not exist; build it with python tools/build_multilingual_eval.py"):
        load_multilingual_set(str(tmp_path / "nowhere"))
    path, index = mset_dir
    index["captions"]["de"] = index["captions"]["de"][:2]
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"languages \['de'\] do not have one entry per image \(3\)"):
        load_multilingual_set(str(path))


@pytest.mark.parametrize("preset", ["tiny-clippo", "tiny"])
def test_retrieval_per_language_against_a_loop_reference(mset_dir, preset):
    """Every language retrieves among the same 3 images; its numbers are those of ranking each
    caption's image (and each image's caption) by hand; a CLIPPO model counts the glyphs Unifont
    lacks (Gothic is outside the Basic Multilingual Plane), a token model reports none."""
    from limoe_ds.data.benchmarks import load_image
    from limoe_ds.data.image import to_tensor
    from limoe_ds.data.render import text_encoder
    path, _ = mset_dir
    mset = load_multilingual_set(str(path))
    torch.manual_seed(0)
    model = build_model(preset, seed=3).eval()
    encoder = text_encoder(model.cfg, str(ROOT / "data" / "mini" / "tokenizer.json"))
    report = multilingual_retrieval(model, encoder, mset, batch_size=2)
    assert report["images"] == 3 and report["skipped_images"] == 0
    assert {k: r["captions"] for k, r in report["languages"].items()} == {"en": 3, "de": 3, "el": 2, "got": 1, "ja": 3}
    with torch.no_grad():
        img = torch.cat([model.encode_image(to_tensor([load_image(p, 32, 10 ** 7)]), None) for p in mset.images])
        for lang, row in report["languages"].items():
            pairs = [(i, c) for i, c in enumerate(mset.captions[lang]) if c]
            txt = torch.cat([model.encode_text(encoder.encode_batch([c], model.cfg.text_len), None) for _, c in pairs])
            s = txt @ img.t()  # [M, N]
            t2i = sum(int(s[m].argmax()) == i for m, (i, _) in enumerate(pairs)) / len(pairs)
            cols = [i for i, _ in pairs]
            i2t = sum(int(s[:, i].argmax()) == m for m, i in enumerate(cols)) / len(pairs)
            assert row["t2i/R@1"] == pytest.approx(t2i) and row["i2t/R@1"] == pytest.approx(i2t), lang
            assert row["t2i/chance@1"] == pytest.approx(1 / 3) and row["i2t/chance@1"] == pytest.approx(1 / len(pairs))
            assert row["t2i/R@5"] == 1.0 and row["t2i/chance@5"] == 1.0  # 3 images: always within 5
    glyphs = [r.get("missing_glyphs") for r in report["languages"].values()]
    if preset == "tiny-clippo":
        assert glyphs == [0, 0, 0, 4, 0] and report["scripts"]["GOTHIC"]["missing_glyphs"] == 4
    else:
        assert glyphs == [None] * 5
    assert set(report["scripts"]) == {"LATIN", "GREEK", "GOTHIC", "KATAKANA"}  # en left out of the means
    assert report["scripts"]["LATIN"]["languages"] == 1
    assert report["scripts"]["LATIN"]["t2i/R@1"] == report["languages"]["de"]["t2i/R@1"]
    table = markdown(report)
    assert "| GREEK | 1 |" in table and "| ja | KATAKANA | 3 |" in table


@pytest.mark.integration  # reference_run: the deepspeed launcher (the tool itself runs in this process)
def test_the_tool_reports_a_checkpoint_and_refuses_what_it_cannot_evaluate(reference_run, mset_dir, tmp_path, capsys):
    import eval_multilingual
    path, _ = mset_dir
    ckpt = reference_run / "checkpoints" / "step00000004"
    out = tmp_path / "report.json"
    assert eval_multilingual.main(["--checkpoint", str(ckpt), "--data", str(path), "--out", str(out),
                                   "--md", str(tmp_path / "t.md")]) == 0
    report = json.loads(out.read_text())
    assert report["step"] == 4 and report["text_input"] == "tokens" and report["routing"] == "dropless"
    assert "tools/eval_multilingual.py" in report["command"] and report["languages"]["ja"]["captions"] == 3
    assert (tmp_path / "t.md").read_text().startswith("3 images (0 unreadable)")
    capsys.readouterr()
    assert eval_multilingual.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: multilingual set:") and "does not exist" in err[0]
