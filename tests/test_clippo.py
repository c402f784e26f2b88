"""CLIPPO (model.text_input='pixels'): captions rendered with Unifont go through the image tower;
no tokenizer, no token embedding. The one-tower MoE twin (NAME-clippo) routes rendered-text
patches as text, so the per-modality losses, BPR and statistics apply unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.model import get_preset
from limoe_ds.data.render import PixelText
from limoe_ds.model import build_model
from limoe_ds.model.limoe import param_counts
from test_collapse import _resolve
from test_train import _launch, _losses


def test_the_clippo_twin_has_no_text_only_parameters():
    tiny, clippo = build_model("tiny"), build_model("tiny-clippo")
    assert clippo.cfg.name == "tiny-clippo" and clippo.cfg.pixels and clippo.cfg.text_font_size == 8
    assert get_preset("b16-clippo").text_font_size == 16 and get_preset("h14-clippo-dense").moe is None
    text_only = {"token_embed.weight", "text_pos", "text_head.weight", "text_head.bias"}
    names = dict(tiny.named_parameters())
    assert set(names) - set(dict(clippo.named_parameters())) == text_only
    a, b = param_counts(tiny), param_counts(clippo)
    # 4096 x 128 token table + 16 x 128 positions + 128 x 128 + 128 head
    assert a["total_params"] - b["total_params"] == sum(names[n].numel() for n in text_only) == 542_848
    assert a["expert_params"] == b["expert_params"]
    # a rendered caption's patch pays what an image patch pays: the same tower, pooling and head
    assert b["active_params_per_text_token"] == b["active_params_per_image_token"] == a["active_params_per_image_token"]
    for name, p in clippo.named_parameters():  # the shared weights initialise as the token model's
        assert torch.equal(p, names[name]), name


def test_a_rendered_caption_is_an_image_to_the_tower_and_text_to_the_router():
    model = build_model("tiny-clippo").eval()
    text = PixelText.for_model(model.cfg)
    px = text.encode_batch(["a photo of a bag.", "an ankle boot", "x"])
    assert px.shape == (3, 3, 32, 32) and px.dtype == torch.float32 and px.max() <= 1 and px.min() >= -1
    # dropless: the same pixels, as a caption or as an image, are the same embedding
    torch.testing.assert_close(model.encode_text(px, None), model.encode_image(px, None), rtol=0, atol=1e-6)
    out = model(torch.zeros(2, 3, 32, 32), px, None)
    for s in out.routing:  # image patches counted as image, rendered-caption patches as text
        assert s.routed_ME.sum(dim=1).tolist() == [2 * 16, 3 * 16]
    assert any("text/local_entropy" in k for k in out.aux_losses)
    with pytest.raises(ValueError, match="reads rendered captions"):
        model.encode_text(torch.ones(3, 16, dtype=torch.long))


@pytest.mark.parametrize("sets, message", [
    (["model.preset=tiny-clippo"], "tokenizer: a CLIPPO model (model.text_input='pixels') renders its captions"),
    (["model.text_input=glyphs"], "model.text_input: must be one of ['tokens', 'pixels']"),
    (["model.preset=tiny-clippo", "tokenizer=null", "model.text_font_size=40"], "model.text_font_size: must be in"),
    (["model.preset=tiny-2t", "model.text_input=pixels", "tokenizer=null"], "use one tower"),
    (["tokenizer=null"], "tokenizer: is required"),
    (["model.preset=tiny-2t-clippo"], "unknown preset 'tiny-2t-clippo'"),
])
def test_clippo_config_errors_name_the_key(sets, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        _resolve(*sets)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_clippo_runs_resumes_exports_and_evaluates(tmp_path):
    """tiny-clippo through the real entry point on 2 ranks with expert parallelism 2 (no tokenizer
    anywhere: the run, the export and the evaluation render their captions): routing statistics
    per modality, a bitwise resume from step 2, an export that loads without tokenizer.json, and
    tools/evaluate.py on one rank giving the run's zero-shot numbers."""
    from test_family import _export_and_evaluate
    sets = ["model.preset=tiny-clippo", "tokenizer=null", "train.save_every=2"]
    full = _launch(tmp_path / "full", 4, sets)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["routing/layer1/text/success_rate"] > 0 for r in rows if "routing/layer1/text/success_rate" in r)
    resumed = _launch(tmp_path / "resumed", 4, [*sets, "eval.zero_shot=[]", "--resume",
                                                str(tmp_path / "full" / "checkpoints" / "step00000002")])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4] and [a[s] for s in b] == [b[s] for s in b]
    loaded, _ = _export_and_evaluate(tmp_path / "full" / "checkpoints" / "step00000004", tmp_path, rows)
    assert not (tmp_path / "export" / "tokenizer.json").exists() and isinstance(loaded.tokenizer, PixelText)
    clf = loaded.zero_shot_classifier(["shirt", "bag"], ["a photo of a {}."])
    assert clf.shape == (2, loaded.cfg.embed_dim)
    assert loaded.tokenize(["a bag"]).shape == (1, 3, 32, 32)
