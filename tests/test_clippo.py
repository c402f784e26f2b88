"""CLIPPO (model.text_input='pixels'): captions rendered with Unifont go through the image tower;
no tokenizer, no token embedding. The one-tower MoE twin (NAME-clippo) routes rendered-text
patches as text, so the per-modality losses, BPR and statistics apply unchanged."""

from __future__ import annotations


import pytest
import torch

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.model import get_preset
from limoe_ds.data.render import PixelText
from limoe_ds.model import build_model
from limoe_ds.model.limoe import param_counts
from test_collapse import _resolve


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


# The 2-rank run of a CLIPPO model (rendered captions in the data workers, no tokenizer in the run,
# the export or the evaluation): tests/test_vlmoe.py's run of tiny-vlmoe-clippo.
