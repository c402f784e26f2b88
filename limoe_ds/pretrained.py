"""Inference without DeepSpeed: an exported directory -> a plain model on one device.

    from limoe_ds import load_pretrained
    m = load_pretrained("exports/b16", device="cuda")
    img_emb = m.encode_image(m.preprocess([Image.open("cat.png")]))     # [B, K], L2-normalised
    txt_emb = m.encode_text(m.tokenize(["a photo of a cat"]))            # [B, K]
    clf = m.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])   # [C, K]
    probs = (img_emb @ clf.T * m.logit_scale).softmax(-1)
    # a model trained with the sigmoid loss (train.loss=sigmoid) scores each pair on its own:
    match = torch.sigmoid(img_emb @ txt_emb.T * m.logit_scale + m.logit_bias)
    # an image classifier (V-MoE, model.num_classes) has no text: class logits [B, C]
    logits = load_pretrained("exports/tiny_vmoe").classify(m.preprocess(images))

No process group, no engine: the MoE layers route dropless (every token reaches its expert,
whatever the batch), so an embedding does not depend on what else is in the batch. The exported
directory is written by ``tools/convert_checkpoint.py export`` (model.safetensors, config.json,
tokenizer.json; no tokenizer for a CLIPPO model or a classifier). ``load_image_tower`` starts a LiT
run's image tower from one (limoe_ds.model.lit), a classifier's export included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from limoe_ds.config.model import config_from_dict
from limoe_ds.model.limoe import LIMoEModel

DROPLESS = None
"""The capacity factor of every pass: dropless, so an embedding does not depend on its batch."""


class Pretrained:
    """A loaded model with its tokenizer; methods run under ``torch.no_grad`` in eval mode."""

    def __init__(self, model: LIMoEModel, tokenizer) -> None:
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.cfg = model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.image_pos.device

    @property
    def logit_scale(self) -> float | None:
        """exp(t), the learned inverse temperature; None for a classifier."""
        t = self.model.logit_scale
        return None if t is None else float(t.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        """b of the sigmoid loss (a model trained with ``train.loss=sigmoid``); None for the softmax loss."""
        bias = self.model.logit_bias
        return None if bias is None else float(bias.detach())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> token ids [B, text_len] (the training tokenizer: lower-cased BPE, EOS, pad 0);
        for a CLIPPO model the rendered captions [B, 3, H, W] (limoe_ds.data.render.PixelText)."""
        return self.tokenizer.encode_batch(list(texts), self.cfg.text_len)

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> [B, 3, H, W] in [-1, 1]: upright RGB, centre crop, resize (the eval transform)."""
        from PIL import ImageOps
        from limoe_ds.data.image import eval_transform, to_rgb, to_tensor
        return to_tensor([eval_transform(to_rgb(ImageOps.exif_transpose(im)), self.cfg.image_size) for im in images])

    @torch.no_grad()
    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images_BCHW.to(self.device), DROPLESS).float()

    @torch.no_grad()
    def encode_text(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens_BT.to(self.device), DROPLESS).float()

    @torch.no_grad()
    def classify(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """A classifier's (V-MoE, ``model.num_classes``) class logits [B, C], dropless."""
        return self.model.classify(images_BCHW.to(self.device), DROPLESS).float()

    @torch.no_grad()
    def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, K]: per class, the mean of its normalised prompt embeddings, renormalised (CLIP)."""
        from limoe_ds.eval.metrics import zero_shot_classifier
        bad = [t for t in templates if "{}" not in t]
        if bad or not templates or not class_names:
            raise ValueError(f"zero_shot_classifier needs class names and templates with '{{}}'; "
                             f"got {bad[:1] or templates!r}")
        prompts = [t.format(c) for c in class_names for t in templates]
        emb = self.encode_text(self.tokenize(prompts))
        return zero_shot_classifier(emb.view(len(class_names), len(templates), -1))


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Pretrained:
    """Load an exported directory into a plain model on ``device`` (dropless routing)."""
    from safetensors.torch import load_file
    from limoe_ds.data import Tokenizer
    from limoe_ds.model import build_model
    path = Path(path)
    cfg_json = path / "config.json"
    raw = json.loads(cfg_json.read_text()) if cfg_json.is_file() else {}
    no_tokenizer = raw.get("text_input") == "pixels" or raw.get("num_classes") is not None
    for f in ("model.safetensors", "config.json") + (() if no_tokenizer else ("tokenizer.json",)):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is missing: not an exported limoe_ds model "
                                    f"(make one with tools/convert_checkpoint.py export)")
    verify_export(path)
    cfg = config_from_dict(json.loads((path / "config.json").read_text()))
    model = build_model(cfg, device="meta")
    from limoe_ds.checkpoint.format import CheckpointError
    try:
        state = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as e:  # safetensors' own errors name no file
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot be read ({type(e).__name__}: {str(e)[:80]}): "
                              f"the file is truncated or damaged; export it again") from None
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    if cfg.classifier:
        return Pretrained(model, None)
    if cfg.pixels:
        from limoe_ds.data.render import PixelText
        return Pretrained(model, PixelText.for_model(cfg))
    return Pretrained(model, Tokenizer.from_file(str(path / "tokenizer.json")))


def load_image_tower(model, path: str | os.PathLike) -> int:
    """Copy the export at ``path`` into ``model``'s image tower (before tensor parallelism: full
    weights; an expert-parallel rank takes its own experts). Returns the number of values copied.
    The export's checksums are verified first; a missing or differently shaped tensor is a
    CheckpointError naming it."""
    from safetensors import safe_open
    from limoe_ds.checkpoint.format import CheckpointError
    from limoe_ds.model.lit import is_image_tower
    from limoe_ds.moe.names import global_expert_name, local_experts
    path = Path(path)
    verify_export(path)
    cfg = model.cfg
    copied = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f, torch.no_grad():
        keys = set(f.keys())
        for name, p in model.named_parameters():
            if not is_image_tower(name):
                continue
            gname = global_expert_name(name, model.ep_rank, local_experts(cfg, name, model.ep_size))
            if gname not in keys:
                raise CheckpointError(f"{path}: has no {gname}; its image tower does not match model's "
                                      f"(train.image_tower.init)")
            value = f.get_tensor(gname)
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: {gname} is {tuple(value.shape)}, the configured image tower's is "
                                      f"{tuple(p.shape)} (train.image_tower.init)")
            p.copy_(value)
            copied += value.numel()
    return copied


def verify_export(path: Path) -> None:
    """The weights' size and checksum against limoe_export.json (exports made before checksums
    were recorded are read as they are, with a note)."""
    import sys
    from limoe_ds.checkpoint import integrity
    from limoe_ds.checkpoint.format import CheckpointError
    info = path / "limoe_export.json"
    try:
        files = json.loads(info.read_text()).get("files") if info.is_file() else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{info}: cannot be read ({type(e).__name__}): the export is damaged; export it "
                              f"again") from None
    if not files:
        print(f"note: {path}: no checksums (exported by an older limoe_ds)", file=sys.stderr, flush=True)
        return
    for name, want in files.items():
        problem = integrity.check_file(path, name, want)
        if problem is not None:
            raise CheckpointError(problem.replace("resume an earlier checkpoint", "export it again"))
