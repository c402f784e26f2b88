"""LIMoE: one transformer tower shared by images and text, with sparse MoE feed-forward layers
(or, with ``model.text_tower``, two towers: the image tower and a text tower of its own).

A plain single-device ``nn.Module``: parallelism (process groups, DeepSpeed) is applied
elsewhere; tensor parallelism by ``limoe_ds.parallel.tp_plan.apply`` from outside. The only layout
facts the model takes are ``ep_size``/``ep_rank`` (how many experts this rank holds, and which, in
DeepSpeed's expert container), so that initialisation gives the same full model whatever the layout.

Legend: B batch, I image patches, T text positions, D width, S routing pool (B*I + B*T), K
shared embedding width.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from limoe_ds.config.model import ModelConfig
from limoe_ds.moe.layer import CONFIGURED, MLP, LIMoELayer, ModalityPools
from limoe_ds.moe.routing import TOKEN_IMAGE, TOKEN_PAD, TOKEN_TEXT, Routing
from limoe_ds.moe.names import layer_experts, local_experts, split_expert_name
from limoe_ds.moe.stats import RoutingStats, aux_key


@dataclass
class LIMoEOutput:
    image_emb: torch.Tensor
    """[B, K], L2-normalised."""
    text_emb: torch.Tensor
    """[B, K], L2-normalised."""
    logit_scale: torch.Tensor | None
    """exp(t), a scalar with grad; None for a classifier (no contrastive temperature)."""
    aux_losses: dict[str, torch.Tensor]
    """Weighted auxiliary losses, e.g. 'moe/layer3/text/global_entropy'; the step sums them."""
    routing: list[RoutingStats]
    """Each MoE layer's routing counts and capacity, in block order."""
    logit_bias: torch.Tensor | None = None
    """b of the sigmoid loss (a scalar with grad); None for a model trained with the softmax loss."""
    logits: torch.Tensor | None = None
    """[B, num_classes], a classifier's (V-MoE, ``model.num_classes``) class logits; None otherwise."""


class Attention(nn.Module):
    """Multi-head self-attention. qkv's rows are [3, heads, head_dim]; the heads a rank holds follow
    from qkv's width (all of them here, 1/tp of them once the tensor-parallel plan split qkv's rows)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        Dh = self.head_dim
        H = self.qkv.weight.shape[0] // (3 * Dh)  # the heads this rank holds
        q, k, v = self.qkv(x_BTD).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
        mask = None
        if valid_BT is not None:
            # A row with no valid key (an all-padding caption) attends to everything rather than NaN.
            mask = (valid_BT | ~valid_BT.any(dim=1, keepdim=True))[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))


class Block(nn.Module):
    """Pre-LN block shared by both modalities; a MoE block routes both modalities in ONE pool.

    ``tower``: the ModelConfig (the one tower, or the image tower) or a TowerConfig (the text
    tower); ``index`` is the block's index in its tower, ``offset`` what makes it the model's block
    index (``self.index``, which names its MoE statistics: the text tower's follow the image's)."""

    def __init__(self, tower, index: int, ep_size: int, offset: int = 0) -> None:
        super().__init__()
        self.index = offset + index
        self.ln1 = nn.LayerNorm(tower.width)
        self.attn = Attention(tower.width, tower.num_heads)
        self.ln2 = nn.LayerNorm(tower.width)
        self.is_moe = tower.is_moe_layer(index)
        if not self.is_moe:
            self.ffn = MLP(tower.width, tower.mlp_dim)
        elif tower.moe.modality_experts:  # VL-MoE: an image pool and a text pool
            self.ffn = ModalityPools(tower.width, tower.mlp_dim, tower.moe, ep_size=ep_size, index=self.index)
        else:
            self.ffn = LIMoELayer(tower.width, tower.mlp_dim, tower.moe, ep_size=ep_size, index=self.index)

    def moe_layers(self) -> list[LIMoELayer]:
        """This block's MoE layers: none, its one pool, or VL-MoE's image and text pools."""
        if not self.is_moe:
            return []
        return self.ffn.pools() if isinstance(self.ffn, ModalityPools) else [self.ffn]

    def forward(self, img_BID: torch.Tensor, txt_BTD: torch.Tensor, txt_valid_BT: torch.Tensor,
                capacity_factor=CONFIGURED) -> tuple[torch.Tensor, torch.Tensor, list[Routing], list[RoutingStats]]:
        """-> (image tokens, text tokens, each pool's routing, each pool's statistics); a dense
        block's lists are empty."""
        img_BID = img_BID + self.attn(self.ln1(img_BID), None)
        txt_BTD = txt_BTD + self.attn(self.ln1(txt_BTD), txt_valid_BT)
        h_img, h_txt = self.ln2(img_BID), self.ln2(txt_BTD)
        if not self.is_moe:
            return img_BID + self.ffn(h_img), txt_BTD + self.ffn(h_txt), [], []
        moe = self._pools if isinstance(self.ffn, ModalityPools) else self._moe
        y_img, y_txt, routing, stats = moe(h_img, h_txt, txt_valid_BT, capacity_factor)
        return img_BID + y_img, txt_BTD + y_txt, routing, stats

    def _moe(self, h_img_BID, h_txt_BTD, txt_valid_BT, capacity_factor):
        """Canonical pool order: all image tokens (sample by sample), then all text tokens."""
        (B_i, I, D), (B_t, T, _) = h_img_BID.shape, h_txt_BTD.shape  # noqa: E741 (I: patches, the legend)
        pool_SD = torch.cat([h_img_BID.reshape(B_i * I, D), h_txt_BTD.reshape(B_t * T, D)])
        type_S = torch.cat([
            torch.full((B_i * I,), TOKEN_IMAGE, dtype=torch.long, device=pool_SD.device),
            torch.where(txt_valid_BT.reshape(-1), TOKEN_TEXT, TOKEN_PAD)])
        y_SD, routing, stats = self.ffn(pool_SD, type_S, capacity_factor, image_slots=B_i * I)
        y_img, y_txt = y_SD.split([B_i * I, B_t * T])
        return y_img.view(B_i, I, D), y_txt.view(B_t, T, D), [routing], [stats]

    def _pools(self, h_img_BID, h_txt_BTD, txt_valid_BT, capacity_factor):
        """VL-MoE: the image patches through the image pool, the text positions (padding typed
        TOKEN_PAD) through the text pool; each pool's capacity from its own slot count. A modality
        absent from the pass (encode_image / encode_text) skips its pool, as it does on every rank
        of that pass (the expert all-to-all needs every rank of the group)."""
        (B_i, I, D), (B_t, T, _) = h_img_BID.shape, h_txt_BTD.shape  # noqa: E741 (I: patches, the legend)
        y_img, y_txt, routing, stats = h_img_BID[:0], h_txt_BTD[:0], [], []
        if B_i * I:
            img_SD = h_img_BID.reshape(B_i * I, D)
            img_type = torch.full((B_i * I,), TOKEN_IMAGE, dtype=torch.long, device=img_SD.device)
            y, r, st = self.ffn.image(img_SD, img_type, capacity_factor, image_slots=B_i * I)
            y_img, routing, stats = y.view(B_i, I, D), [r], [st]
        if B_t * T:
            txt_type = torch.where(txt_valid_BT.reshape(-1), TOKEN_TEXT, TOKEN_PAD)
            y, r, st = self.ffn.text(h_txt_BTD.reshape(B_t * T, D), txt_type, capacity_factor, image_slots=0)
            y_txt, routing, stats = y.view(B_t, T, D), routing + [r], stats + [st]
        return y_img, y_txt, routing, stats


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision): a learned probe attends over the tokens."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x_BTD.shape[0], -1, -1)
        pad = ~(valid_BT | ~valid_BT.any(dim=1, keepdim=True))
        y = self.attn(probe, x_BTD, x_BTD, key_padding_mask=pad, need_weights=False)[0]
        return (y + self.mlp(self.ln(y)))[:, 0]


class TextTower(nn.Module):
    """A two-tower model's text tower: its blocks (numbered after the image tower's) and final norm."""

    def __init__(self, cfg: ModelConfig, ep_size: int) -> None:
        super().__init__()
        t = cfg.text_tower
        self.blocks = nn.ModuleList(Block(t, i, ep_size, offset=cfg.text_block_offset) for i in range(t.depth))
        self.final_ln = nn.LayerNorm(t.width)


class LIMoEModel(nn.Module):
    """LIMoE: one tower for both modalities, or two (``cfg.text_tower``). ``forward(images, tokens)``
    is the training forward."""

    def __init__(self, cfg: ModelConfig, *, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.cfg, self.ep_size, self.ep_rank = cfg, ep_size, ep_rank
        self.tp_degree = 1
        """Tensor-parallel ranks this model is split over (set by limoe_ds.parallel.tp_plan.apply)."""
        D, Dt = cfg.width, cfg.text_width
        text = cfg.text_tower or cfg
        self.patch_embed = nn.Conv2d(cfg.channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.image_pos = nn.Parameter(torch.empty(1, cfg.num_patches, D))
        # CLIPPO (text_input='pixels'): a rendered caption goes through patch_embed, image_pos, the
        # tower, image_pool and image_head like a photo; there are no text-only parameters. A
        # classifier (V-MoE, num_classes) has no text at all.
        no_text = cfg.pixels or cfg.classifier
        self.token_embed = None if no_text else nn.Embedding(cfg.vocab_size, Dt)
        self.text_pos = None if no_text else nn.Parameter(torch.empty(1, cfg.text_len, Dt))
        self.blocks = nn.ModuleList(Block(cfg, i, ep_size) for i in range(cfg.depth))
        """The one tower's blocks, or the image tower's."""
        self.final_ln = nn.LayerNorm(D)
        self.text_tower = TextTower(cfg, ep_size) if cfg.two_tower else None
        if cfg.pooling == "map":
            self.image_pool = MAPHead(D, cfg.num_heads, cfg.mlp_dim)
            self.text_pool = None if no_text else MAPHead(Dt, text.num_heads, text.mlp_dim)
        self.image_head = nn.Linear(D, cfg.embed_dim)
        """The image embedding; a classifier's pre-logits (class_head reads it, before the L2 norm)."""
        self.text_head = None if no_text else nn.Linear(Dt, cfg.embed_dim)
        self.class_head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.classifier else None
        """V-MoE's classification head, zero-initialised (big_vision's head_zeroinit): at step 0
        every class has logit 0 (softmax cross-entropy log C)."""
        # t, with exp(t) the inverse temperature; shape [1], not [] (DeepSpeed cannot broadcast 0-dim params)
        self.logit_scale = None if cfg.classifier else nn.Parameter(torch.empty(1))
        # b, the sigmoid loss's learned bias (train.loss=sigmoid); a softmax model has none
        self.logit_bias = nn.Parameter(torch.empty(1)) if cfg.logit_bias_init is not None else None
        self.activation_checkpointing = False
        """Recompute each block in the backward pass; torch replays the RNG state, so the router
        noise (and hence the routing) of the recomputation equals the original forward's."""

    # -- inputs -------------------------------------------------------------------------------
    def embed_images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> patch tokens [B, I, D]."""
        x = self.patch_embed(images_BCHW.to(self.patch_embed.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.image_pos

    def embed_text(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids -> (tokens [B, T, D], valid [B, T]); ``cfg.pad_id`` marks padding. CLIPPO:
        rendered captions [B, C, H, W] -> (their patches [B, I, D], all valid)."""
        if self.cfg.pixels:
            if tokens_BT.dim() != 4:
                raise ValueError(f"a CLIPPO model (model.text_input='pixels') reads rendered captions "
                                 f"[B, C, H, W], got a tensor of shape {tuple(tokens_BT.shape)}; render them "
                                 f"with limoe_ds.data.render.PixelText")
            x_BID = self.embed_images(tokens_BT)
            return x_BID, torch.ones(x_BID.shape[:2], dtype=torch.bool, device=x_BID.device)
        if tokens_BT.shape[1] != self.cfg.text_len:
            raise ValueError(f"token_ids have length {tokens_BT.shape[1]}, the model's text_len is "
                             f"{self.cfg.text_len}; pad or truncate with the tokenizer")
        return self.token_embed(tokens_BT) + self.text_pos, tokens_BT != self.cfg.pad_id

    # -- tower ----------------------------------------------------------------------------------
    def _tower(self, img_BID, txt_BTD, txt_valid_BT, capacity_factor):
        """The one tower (both modalities), or each modality through its own tower."""
        if self.text_tower is None:
            img_BID, txt_BTD, aux, stats = self._run(self.blocks, img_BID, txt_BTD, txt_valid_BT, capacity_factor)
            return self.final_ln(img_BID), self.final_ln(txt_BTD), aux, stats
        aux, stats = {}, []
        # a modality absent from this pass (encode_text / encode_image) skips its tower on every rank
        if img_BID.shape[0] > 0:
            no_txt = img_BID.new_zeros(0, self.cfg.text_positions, self.cfg.width)
            img_BID, _, aux, stats = self._run(self.blocks, img_BID, no_txt, txt_valid_BT[:0], capacity_factor)
        if txt_BTD.shape[0] > 0:
            no_img = txt_BTD.new_zeros(0, self.cfg.num_patches, self.cfg.text_width)
            _, txt_BTD, aux_t, stats_t = self._run(self.text_tower.blocks, no_img, txt_BTD, txt_valid_BT,
                                                   capacity_factor)
            aux, stats = {**aux, **aux_t}, stats + stats_t
            txt_BTD = self.text_tower.final_ln(txt_BTD)
        return self.final_ln(img_BID), txt_BTD, aux, stats

    def _run(self, blocks, img_BID, txt_BTD, txt_valid_BT, capacity_factor):
        aux, stats = {}, []
        for block in blocks:
            if self.activation_checkpointing and self.training:
                img_BID, txt_BTD, routing, layer_stats = torch.utils.checkpoint.checkpoint(
                    block, img_BID, txt_BTD, txt_valid_BT, capacity_factor, use_reentrant=False,
                    preserve_rng_state=True)
            else:
                img_BID, txt_BTD, routing, layer_stats = block(img_BID, txt_BTD, txt_valid_BT, capacity_factor)
            for r, s in zip(routing, layer_stats):
                aux.update({aux_key(s.layer, term, s.pool): v for term, v in r.aux.items()})
                stats.append(s)
        return img_BID, txt_BTD, aux, stats

    def _pool(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor, which: str) -> torch.Tensor:
        if self.cfg.pooling == "map":
            return getattr(self, f"{which}_pool")(x_BTD, valid_BT)
        w = valid_BT.to(x_BTD.dtype)[..., None]
        return (x_BTD * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)

    def forward(self, images_BCHW: torch.Tensor | None, tokens_BT: torch.Tensor | None,
                capacity_factor=CONFIGURED) -> LIMoEOutput:
        """Embed a batch of images and/or captions; either may be None (then routed alone).

        ``capacity_factor``: how the MoE layers route this pass: a float, None = dropless, or
        CONFIGURED (``moe.capacity_factor`` in training mode, ``moe.eval_capacity_factor`` in eval)."""
        if images_BCHW is None and tokens_BT is None:
            raise ValueError("forward needs images, tokens, or both")
        if self.cfg.classifier and tokens_BT is not None:
            raise ValueError("a classifier (model.num_classes, V-MoE) reads images only; call it with tokens=None")
        img_BID = (self.embed_images(images_BCHW) if images_BCHW is not None
                   else self.image_pos.new_zeros(0, self.cfg.num_patches, self.cfg.width))
        if tokens_BT is not None:
            txt_BTD, txt_valid_BT = self.embed_text(tokens_BT)
        else:
            txt_BTD = self.image_pos.new_zeros(0, self.cfg.text_positions, self.cfg.text_width)
            txt_valid_BT = torch.zeros(0, self.cfg.text_positions, dtype=torch.bool, device=txt_BTD.device)
        img_BID, txt_BTD, aux, stats = self._tower(img_BID, txt_BTD, txt_valid_BT, capacity_factor)
        img_valid_BI = torch.ones(img_BID.shape[:2], dtype=torch.bool, device=img_BID.device)
        pre_logits = self.image_head(self._pool(img_BID, img_valid_BI, "image"))
        image_emb = F.normalize(pre_logits, dim=-1)
        if self.class_head is not None:  # V-MoE: image-only, no text, no temperature
            return LIMoEOutput(image_emb, image_emb[:0], None, aux, stats, logits=self.class_head(pre_logits))
        text = "image" if self.cfg.pixels else "text"  # CLIPPO: the image pooling and head for both
        text_emb = F.normalize(getattr(self, f"{text}_head")(self._pool(txt_BTD, txt_valid_BT, text)), dim=-1)
        bias = self.logit_bias[0] if self.logit_bias is not None else None
        return LIMoEOutput(image_emb, text_emb, self.logit_scale[0].exp(), aux, stats, bias)

    def encode_image(self, images_BCHW: torch.Tensor, capacity_factor=CONFIGURED) -> torch.Tensor:
        """L2-normalised image embeddings [B, K]."""
        return self(images_BCHW, None, capacity_factor).image_emb

    def encode_text(self, tokens_BT: torch.Tensor, capacity_factor=CONFIGURED) -> torch.Tensor:
        """L2-normalised text embeddings [B, K]."""
        if self.cfg.classifier:
            raise ValueError("a classifier (model.num_classes, V-MoE) has no text input; use classify(images)")
        return self(None, tokens_BT, capacity_factor).text_emb

    def classify(self, images_BCHW: torch.Tensor, capacity_factor=CONFIGURED) -> torch.Tensor:
        """A classifier's class logits [B, num_classes]."""
        if not self.cfg.classifier:
            raise ValueError("classify needs a classifier (model.num_classes, e.g. model.preset=tiny-vmoe)")
        return self(images_BCHW, None, capacity_factor).logits

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """exp(t) <= temperature_max, applied after each optimizer step (open_clip), not in forward."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(max=math.log(self.cfg.temperature_max))

    def all_blocks(self) -> list[Block]:
        """Every block of the model in index order: the one tower's, or the image tower's then the text tower's."""
        return list(self.blocks) + (list(self.text_tower.blocks) if self.text_tower is not None else [])

    def moe_layers(self) -> list[LIMoELayer]:
        """Every MoE layer in model order (VL-MoE: a block's image pool, then its text pool)."""
        return [layer for b in self.all_blocks() for layer in b.moe_layers()]


@torch.no_grad()
def init_weights(model: LIMoEModel, seed: int) -> None:
    """Initialise every parameter from its own generator, seeded by (seed, global name).

    Expert parameters are named by their GLOBAL expert index, so the same seed gives the same full
    model whatever the expert-parallel layout; tensor parallelism shards the initialised full weights
    afterwards (``limoe_ds.parallel.tp_plan.apply``). Runs are comparable and checkpoints convertible.
    """
    cfg = model.cfg
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.is_meta:
                continue
            name = f"{mod_name}.{p_name}"
            name = _seed_name(name, model.ep_rank, local_experts(cfg, name, model.ep_size))
            gen = torch.Generator(device=p.device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            if p is model.logit_scale:
                p.fill_(math.log(cfg.temperature_init))
            elif p is model.logit_bias:
                p.fill_(cfg.logit_bias_init)
            elif mod is model.class_head:
                p.zero_()
            elif isinstance(mod, nn.LayerNorm):
                p.fill_(1.0 if p_name == "weight" else 0.0)
            elif p_name.endswith("bias"):
                p.zero_()
            elif isinstance(mod, MAPHead) and p_name == "probe":
                nn.init.normal_(p, std=cfg.init_std, generator=gen)
            else:
                nn.init.trunc_normal_(p, std=cfg.init_std, a=-2 * cfg.init_std, b=2 * cfg.init_std, generator=gen)


def _seed_name(name: str, ep_rank: int, num_local: int) -> str:
    """The string an initial weight's generator is seeded with: the parameter name with a local
    expert's 'deepspeed_experts.<i>.' written 'expert<global index>.' (a top-level parameter keeps
    its leading '.'). It fixes every initial weight: never change it."""
    parts = split_expert_name(name)
    if parts is None:
        return name
    head, local, rest = parts
    return f"{head}deepspeed_moe.experts.expert{ep_rank * num_local + local}.{rest}"


def build_model(cfg: ModelConfig | str, *, ep_size: int = 1, ep_rank: int = 0, seed: int = 0,
                device: torch.device | str | None = None) -> LIMoEModel:
    """Build (and initialise, unless on the meta device) a LIMoE model from a config or preset name."""
    if isinstance(cfg, str):
        from limoe_ds.config.model import get_preset
        cfg = get_preset(cfg)
    with torch.device(device or "cpu"):
        model = LIMoEModel(cfg, ep_size=ep_size, ep_rank=ep_rank)
    init_weights(model, seed)
    return model


def param_counts(model: LIMoEModel) -> dict[str, int]:
    """Total parameters and active parameters per token (spec: 'Parameter accounting').

    active = total minus, in every MoE layer, the experts a token does not use: all but one expert
    of its pool (VL-MoE: of its modality's pool; the other pool entirely). Counted on a model
    holding all experts (ep_size=1).
    """
    assert model.ep_size == 1 and model.tp_degree == 1, "count parameters on a full model (ep_size=1, tp=1)"
    total = sum(p.numel() for p in model.parameters())
    sizes = [(sum(p.numel() for p in layer.deepspeed_moe.experts.parameters()), layer.cfg.num_experts)
             for layer in model.moe_layers()]
    expert = sum(n for n, _ in sizes)
    moe = model.cfg.any_moe
    pools = 2 if moe is not None and moe.modality_experts else 1  # VL-MoE: a token uses 1 of its pool's E
    used = sum(n // E for n, E in sizes) // pools  # one expert MLP per MoE layer (the same size in each pool)
    counts = {"total_params": total, "active_params_per_token": total - expert + used, "expert_params": expert,
              "shared_params": total - expert}
    # per modality: the parameters whose multiply-adds a token of that modality pays (the patch
    # embedding, its tower with 1/E of each MoE layer's experts, its pooling and head; not the
    # token-embedding table, a lookup): the per-token compute a compute-matched comparison of one-
    # and two-tower models equalises
    for m in ("image",) if model.cfg.classifier else ("image", "text"):
        counts[f"active_params_per_{m}_token"] = sum(p.numel() // layer_experts(model.cfg, n)
                                                     for n, p in model.named_parameters() if m in _used_by(n, model))
    return counts


def flops_per_sample(model: LIMoEModel) -> dict[str, int]:
    """Training FLOPs per sample (an image-caption pair; a classifier's image), the equal-compute
    currency of tools/experiment.py: per modality m with n_m positions (the image's patches; the
    caption's text_len tokens, padding included, or its rendered patches),

        forward_m = 2 * n_m * active_params_per_m_token + sum over m's blocks of 4 * n_m**2 * width

    (a multiply-add is 2 FLOPs; the second term is attention's scores and weighted sum), and
    training = 3 x forward (the backward pass costs twice the forward). The pooling and head
    parameters are counted per token, as ``param_counts`` does (an overestimate of about 1% in
    tiny); the contrastive logits (B x D per sample) are left out. With expert parallelism or
    capacity dropping, the FLOPs are those of the routing decision (a dropped token skips its
    expert but is counted): the configured compute, not a profile."""
    counts = param_counts(model)
    cfg = model.cfg
    towers = dict(model.cfg.towers())
    forward = 0
    for m in ("image",) if cfg.classifier else ("image", "text"):
        n = cfg.num_patches if m == "image" else cfg.text_positions
        tower = towers.get(m, towers.get("shared"))
        forward += 2 * n * counts[f"active_params_per_{m}_token"] + tower.depth * 4 * n * n * tower.width
    return {"forward": forward, "train": 3 * forward}


_IMAGE_ONLY = ("patch_embed.", "image_pos", "image_pool.", "image_head.", "class_head.")
_TEXT_ONLY = ("text_pos", "text_pool.", "text_head.", "text_tower.")


def _used_by(name: str, model: LIMoEModel) -> set[str]:
    """The modalities whose tokens pay multiply-adds for parameter ``name``."""
    if name.startswith("token_embed."):
        return set()  # a table lookup
    if name.startswith(_IMAGE_ONLY):
        return {"image", "text"} if model.cfg.pixels else {"image"}  # CLIPPO: text is pixels too
    if name.startswith(_TEXT_ONLY):
        return {"text"}
    if ".ffn.image." in name or ".ffn.text." in name:  # VL-MoE: a modality's own expert pool
        return {"image"} if ".ffn.image." in name else {"text"}
    if name.startswith(("blocks.", "final_ln.")):
        return {"image"} if model.text_tower is not None else {"image", "text"}
    return {"image", "text"}  # logit_scale, logit_bias
