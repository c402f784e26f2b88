"""Tokenizer: pad id 0, sticky EOS, truncation, padding, round trip; the training CLI."""

import json
import sys
from pathlib import Path

import pytest
import torch

from data_helpers import write_tar
from limoe_ds.data.tokenizer import Tokenizer, train_bpe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import train_tokenizer  # noqa: E402

CAPTIONS = ["A marmot.", "A brown hen.", "A great blue heron.", "Soft Blue Couch, furniture", "a photo of a dress",
            "Tux—the Linux mascot!", "pesca, fruit"] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(CAPTIONS, vocab_size=400).save(str(path))
    return Tokenizer.from_file(str(path))


def test_special_ids(tok):
    assert tok.pad_id == 0 and tok.eos_id == 1
    assert 258 <= tok.vocab_size <= 400  # 256 byte symbols + 2 specials + merges


def test_padding_and_sticky_eos(tok):
    ids = tok.encode("a marmot.")
    out = tok.encode_batch(["A Marmot.", ""], text_len=len(ids) + 3)
    assert out.dtype == torch.int64 and out.shape == (2, len(ids) + 3)
    # row 0: the ids, EOS, then two PADs; lower-casing makes "A Marmot." == "a marmot."
    assert out[0].tolist() == ids + [1, 0, 0]
    # an empty caption is just EOS: mean pooling still has one token
    assert out[1].tolist() == [1] + [0] * (len(ids) + 2)


def test_truncation_keeps_eos(tok):
    long = " ".join(["heron"] * 50)
    out = tok.encode_batch([long], text_len=6)
    assert out[0, -1].item() == tok.eos_id and (out[0, :-1] != 0).all()
    assert out[0, :5].tolist() == tok.encode(long)[:5]


def test_round_trip(tok):
    for text in ["a great blue heron.", "tux—the linux mascot!", "ünïcödé 日本 works too"]:
        row = tok.encode_batch([text], text_len=64)[0]
        assert tok.decode(row) == text


def test_rejects_tokenizer_without_pad_zero(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<pad>"]))
    hf.save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="must have id 0"):
        Tokenizer.from_file(str(tmp_path / "t.json"))


def test_cli_trains_from_shards_and_text(tmp_path):
    members = []
    for i, cap in enumerate(CAPTIONS):
        members.append((f"k{i}.json", json.dumps({"caption": cap}).encode()))
    members.append(("bad.txt", b"\xff\xfe"))
    write_tar(tmp_path / "a.tar", members)
    (tmp_path / "b.txt").write_text("\n".join(CAPTIONS) + "\n   \n")
    out = tmp_path / "out" / "tokenizer.json"
    assert train_tokenizer.main([str(tmp_path / "*.tar"), str(tmp_path / "b.txt"), "--out", str(out),
                                 "--vocab-size", "300"]) == 0
    tok = Tokenizer.from_file(str(out))
    assert tok.pad_id == 0 and tok.vocab_size <= 300
    assert train_tokenizer.main([str(tmp_path / "none-*.tar"), "--out", str(out)]) == 2
