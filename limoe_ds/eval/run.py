"""Evaluation passes on 1 or N ranks: embed, gather, score. Every metric twice: dropless routing
(the canonical number) and at the training capacity factor (a capacity-limited MoE's output
depends on what else is in the batch, so that number is reported beside, not instead).

Expert-parallel ranks must run the same number of forward passes (the all-to-all), and data-
parallel ranks may hold different numbers of evaluation batches, so every pass walks the data in
lockstep (``lockstep``): a rank that has run out forwards a dummy batch whose outputs are dropped.
Both routings come from ONE walk over the data: every batch is decoded once and forwarded once per
mode (``modes``), so a benchmark's images are read once, not twice.
Legend: N images, M captions, K embedding width, B batch, I image patches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from limoe_ds.data.errors import SKIP_REASONS
from limoe_ds import parallel
from limoe_ds.moe.layer import CONFIGURED
from limoe_ds.parallel import collectives
from limoe_ds.parallel.collectives import any_rank
from limoe_ds.eval import metrics
from limoe_ds.losses import pair_loss
from limoe_ds.moe import stats


def _group():
    """Evaluation collectives run over the data-parallel group: tensor-parallel peers embed the
    same samples and must not be counted twice (None = the world when no layout was set up)."""
    return parallel.data_parallel_group()


def lockstep(batches: Iterable, make_dummy: Callable[[], object]) -> Iterator[tuple[object, bool]]:
    """Yield (batch, real) until EVERY rank is out of data; real=False marks a dummy pass."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not any_rank(batch is not None, _group()):
            return
        yield (batch, True) if batch is not None else (make_dummy(), False)


def gather_rows(x_NK: torch.Tensor) -> torch.Tensor:
    """Every data-parallel rank's rows in rank order (ranks may hold different numbers of rows)."""
    return collectives.gather_rows(x_NK, _group())


Modes = dict[str, float | None] | None  # mode name -> capacity factor (None: dropless)


def _runs(modes) -> list[tuple[str, object]]:
    """[(mode, capacity factor)] for each routing mode (None = dropless); ``modes=None``: one pass at
    the model's configured routing (``CONFIGURED``), keyed ''."""
    if modes is None:
        return [("", CONFIGURED)]
    return list(modes.items())


def _result(results: dict, modes):
    return results[""] if modes is None else results


def _device(model):
    return next(model.parameters()).device


def _dummy_pair(model):
    c = model.cfg
    images = torch.zeros(1, c.channels, c.image_size, c.image_size)
    if c.classifier:
        return {"images": images, "labels": torch.zeros(1, dtype=torch.long)}
    return {"images": images, "tokens": torch.ones(1, c.text_len, dtype=torch.long)}


@contextlib.contextmanager
def batch_priority(model, enabled: bool) -> Iterator[None]:
    """While open, every MoE layer routes with Batch Priority Routing on or off (``enabled``),
    whatever its config says: V-MoE's inference comparison (tools/capacity_curve.py)."""
    layers = model.moe_layers()
    saved = [layer.cfg for layer in layers]
    try:
        for layer in layers:
            layer.cfg = dataclasses.replace(layer.cfg, batch_priority=enabled)
        yield
    finally:
        for layer, cfg in zip(layers, saved):
            layer.cfg = cfg


def _walk(model, loader, runs, max_batches: int, record: RoutingRecord | None, *, text_key: str | None):
    """One lockstep walk over ``loader``: every batch forwarded once per routing mode of ``runs``
    (``text_key``: the batch's text input, None for a classifier's images alone); yields (mode,
    output, batch) of the real batches. ``record`` is filled by the first mode's passes (before
    another mode's pass moves the hooks) and summed over ranks at the end of the walk."""
    device = _device(model)
    with expert_choices(model, enabled=record is not None and record.sample_images > 0) as experts:
        for n, (batch, real) in enumerate(lockstep(loader, lambda: _dummy_pair(model))):
            if max_batches and n >= max_batches:
                break  # every rank reaches the same n: lockstep
            images = batch["images"].to(device)
            text = batch[text_key].to(device) if text_key is not None else None
            for m, cf in runs:
                out = model(images, text, cf)
                if record is not None and m == runs[0][0]:
                    record.add(out, real)
                    if real and experts and record.images_BCHW is None:
                        record.take_sample(batch["images"], experts, model.cfg.num_patches)
                if real:
                    yield m, out, batch
    if record is not None:
        record.totals = stats.sum_over_ranks(record.totals, _group())


@torch.no_grad()
def classify_images(model, loader, *, max_batches: int = 0, record: RoutingRecord | None = None,
                    modes: Modes = None) -> dict:
    """A classifier's (V-MoE) held-out labelled images, all ranks: {top1, top5 (with >= 5 classes),
    xent (softmax cross-entropy, whatever the training loss), images}; with ``modes``, {mode: that}
    from one walk over the loader. ``record`` is filled by the first mode, as in ``embed_pairs``."""
    device = _device(model)
    runs = _runs(modes)
    C = model.cfg.num_classes
    sums = {m: torch.zeros(4, dtype=torch.float64, device=device) for m, _ in runs}  # top1, top5, xent, n
    for m, out, batch in _walk(model, loader, runs, max_batches, record, text_key=None):
        labels = batch["labels"].to(device)
        logits = out.logits.float()
        top = logits.topk(min(5, C), dim=1).indices
        hit = top == labels[:, None]
        sums[m] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
                                torch.tensor(float(labels.numel()), device=device)]).double()
    results = {}
    for m, _ in runs:
        collectives.sum_(sums[m], _group())
        top1, top5, xent, count = sums[m].tolist()
        res = {"top1": top1 / count if count else math.nan, "xent": xent / count if count else math.nan,
               "images": int(count)}
        if C >= 5:
            res["top5"] = top5 / count if count else math.nan
        results[m] = res
    return _result(results, modes)


@dataclass
class RoutingRecord:
    """What a validation pass routed, for the expert figures (``limoe_ds.eval.figures``).

    ``totals``: the routing counts of every rank's real batches, summed over ranks (so EVERY rank must
    pass a record to the same call: the sum is a collective). ``images_BCHW`` / ``experts_BI``: this
    rank's first ``sample_images`` validation images and, per MoE layer index, the expert each patch
    went to (local forward hooks, no communication; 0 = none, e.g. on ranks that draw nothing)."""

    sample_images: int = 0
    totals: stats.Totals = field(default_factory=dict)
    images_BCHW: torch.Tensor | None = None
    experts_BI: dict[int, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, dict]:
        """Per MoE layer and modality (``stats.summarize``)."""
        return stats.summarize(self.totals)

    def add(self, out, real: bool) -> None:
        # A dummy pass adds zeros, so every rank holds the same layers for the sum.
        stats.accumulate(self.totals, out.routing if real else [s.zeros_like() for s in out.routing])

    def take_sample(self, images_BCHW: torch.Tensor, expert_S: dict[int, torch.Tensor], patches: int) -> None:
        """Keep the first images and their patches' experts (the pool holds image tokens first)."""
        n = min(self.sample_images, images_BCHW.shape[0])
        self.images_BCHW = images_BCHW[:n].detach().float().cpu()
        self.experts_BI = {k: v[:images_BCHW.shape[0] * patches].view(-1, patches)[:n].cpu()
                           for k, v in expert_S.items()}


def _capture(store: dict[int, torch.Tensor], index: int, _module, _inputs, output) -> None:
    store[index] = output[1].expert_N.detach()  # LIMoELayer -> (y, Routing, RoutingStats)


@contextlib.contextmanager
def expert_choices(model, enabled: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """While open: {MoE layer index: expert id of each routed slot in the latest forward pass}."""
    store: dict[int, torch.Tensor] = {}
    # the layers image patches go through: the one tower's (or image tower's) pools; VL-MoE's image pools
    hooks = [layer.register_forward_hook(functools.partial(_capture, store, b.index))
             for b in model.blocks for layer in b.moe_layers() if layer.pool != "text"] if enabled else []
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def embed_pairs(model, loader, *, max_batches: int = 0, record: RoutingRecord | None = None,
                modes: Modes = None):
    """All ranks' validation pairs -> (image_emb, text_emb) in rank order, plus the mean in-batch
    contrastive loss over all pairs and the number of pairs; with ``modes``, {mode: that tuple}
    from one walk over the loader. ``record`` (see RoutingRecord) is filled by the first mode."""
    device = _device(model)
    runs = _runs(modes)
    imgs = {m: [] for m, _ in runs}
    txts = {m: [] for m, _ in runs}
    loss_sum = {m: torch.zeros(2, dtype=torch.float64, device=device) for m, _ in runs}
    for m, out, _ in _walk(model, loader, runs, max_batches, record, text_key="tokens"):
        B = out.image_emb.shape[0]
        imgs[m].append(out.image_emb.float())
        txts[m].append(out.text_emb.float())
        loss = pair_loss(out, group=False).item()  # in-batch: softmax or sigmoid, the model's
        loss_sum[m] += torch.tensor([loss * B, B], dtype=torch.float64, device=device)
    K = model.cfg.embed_dim
    results = {}
    for m, _ in runs:
        collectives.sum_(loss_sum[m], _group())
        img = gather_rows(torch.cat(imgs[m]) if imgs[m] else torch.zeros(0, K, device=device))
        txt = gather_rows(torch.cat(txts[m]) if txts[m] else torch.zeros(0, K, device=device))
        pairs = int(loss_sum[m][1].item())
        results[m] = img, txt, (loss_sum[m][0] / loss_sum[m][1]).item() if pairs else math.nan, pairs
    return _result(results, modes)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], *, batch_size: int = 256,
                capacity_factor=CONFIGURED) -> torch.Tensor:
    """Every rank embeds the same texts (same number of passes on every rank)."""
    device = _device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer.encode_batch(texts[i:i + batch_size], model.cfg.text_len).to(device)
        out.append(model.encode_text(tokens, capacity_factor).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts_split(model, tokenizer, texts: list[str], *, dp_rank: int, dp_size: int,
                      batch_size: int = 256, capacity_factor=CONFIGURED) -> torch.Tensor:
    """Each rank embeds its contiguous share of the texts; gathered in rank order = text order."""
    from limoe_ds.data.benchmarks import rank_share
    device = _device(model)
    share = rank_share(len(texts), dp_rank, dp_size)
    mine = texts[share.start:share.stop]
    batches = (mine[i:i + batch_size] for i in range(0, len(mine), batch_size))
    out = []
    for chunk, real in lockstep(batches, lambda: None):
        tokens = (tokenizer.encode_batch(chunk, model.cfg.text_len) if real else _dummy_text(model, tokenizer))
        emb = model.encode_text(tokens.to(device), capacity_factor).float()
        if real:
            out.append(emb)
    return gather_rows(torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim, device=device))


def _dummy_text(model, tokenizer) -> torch.Tensor:
    """One caption for a rank without texts left to keep its passes in step (its output unused)."""
    if model.cfg.pixels:
        return tokenizer.encode_batch(["-"])
    return torch.ones(1, model.cfg.text_len, dtype=torch.long)


def _dummy_labelled_image(model):
    c = model.cfg
    return torch.zeros(1, c.channels, c.image_size, c.image_size), torch.zeros(1, dtype=torch.long)


def _skipped(counts: dict[str, int]) -> int:
    return sum(counts[r] for r in SKIP_REASONS)


@torch.no_grad()
def zero_shot(model, zs, tokenizer, *, dp_rank: int, dp_size: int, batch_size: int = 500,
              modes: Modes = None, max_images: int = 0) -> dict:
    """Top-1/top-5 accuracy over the set and the images that could not be read (skipped, counted);
    where the set names the classes seen in training, top-1 on its seen and unseen classes apart.
    ``zs``: a ZeroShotSet or a benchmarks.ClassFolderSet (no seen/unseen split). With ``modes``,
    {mode: metrics}, each image decoded once. ``max_images`` (0 = all): at most this many images,
    the same ones whatever the number of ranks (the set's ``iter_batches`` says which)."""
    device = _device(model)
    runs = _runs(modes)
    prompts = zs.prompts()  # [C][T]
    C, T = len(prompts), len(prompts[0])
    classifier_CK = {}
    for m, cf in runs:
        classifier_CK[m] = metrics.zero_shot_classifier(
            embed_texts(model, tokenizer, [p for ps in prompts for p in ps], capacity_factor=cf).view(C, T, -1))
    c = model.cfg
    split = bool(zs.seen_classes or zs.unseen_classes)
    # top1, top5, n, seen top1, seen n, unseen top1 (C-way), unseen top1 among the unseen names only, skipped
    counts = {m: torch.zeros(8, dtype=torch.float64, device=device) for m, _ in runs}
    seen = torch.tensor(sorted(zs.seen_classes), dtype=torch.long, device=device)
    unseen = torch.tensor(sorted(zs.unseen_classes), dtype=torch.long, device=device)
    remap = torch.full((C,), 0, dtype=torch.long, device=device)
    remap[unseen] = torch.arange(len(unseen), device=device)
    batches = zs.iter_batches(image_size=c.image_size, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                              max_images=max_images)
    for (images, labels), real in lockstep(batches, lambda: _dummy_labelled_image(model)):
        images, labels = images.to(device), labels.to(device)
        is_seen = torch.isin(labels, seen)
        n = torch.tensor(float(len(labels)), dtype=torch.float64, device=device)
        for m, cf in runs:
            image_emb = model.encode_image(images, cf)
            if not real:
                continue
            correct = metrics.topk_correct(image_emb, classifier_CK[m], labels)
            top1 = correct[1].double()
            among_unseen = (metrics.topk_correct(image_emb, classifier_CK[m][unseen], remap[labels], ks=(1,))[1]
                            & ~is_seen if len(unseen) else torch.zeros_like(is_seen))
            counts[m][:7] += torch.stack([top1.sum(), correct[5].double().sum(), n, (top1 * is_seen).sum(),
                                          is_seen.double().sum(), (top1 * ~is_seen).sum(),
                                          among_unseen.double().sum()])
    results = {}
    for m, _ in runs:
        counts[m][7] = _skipped(zs.skip_counts)
        collectives.sum_(counts[m], _group())
        top1, top5, n, seen_top1, n_seen, unseen_top1, among, skipped = counts[m].tolist()
        out = {"top1": top1 / n if n else math.nan, "top5": top5 / n if n else math.nan, "images": int(n),
               "skipped_images": int(skipped), "chance_top1": 1.0 / C}
        if split:
            n_unseen = n - n_seen
            out.update({"seen_top1": seen_top1 / n_seen if n_seen else math.nan,
                        "unseen_top1": unseen_top1 / n_unseen if n_unseen else math.nan,
                        "unseen_top1_among_unseen": among / n_unseen if n_unseen else math.nan,
                        "chance_among_unseen": 1.0 / len(unseen) if len(unseen) else math.nan})
        results[m] = out
    return _result(results, modes)


@torch.no_grad()
def embed_images(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], modes: Modes = None):
    """(images, ids) batches of this rank -> every rank's (image_emb [N, K], ids [N]) in rank order;
    with ``modes``, {mode: that pair}, each batch read once."""
    device = _device(model)
    runs = _runs(modes)
    embs, ids = {m: [] for m, _ in runs}, []
    for (images, idx), real in lockstep(batches, lambda: _dummy_labelled_image(model)):
        images = images.to(device)
        for m, cf in runs:
            emb = model.encode_image(images, cf).float()
            if real:
                embs[m].append(emb)
        if real:
            ids.append(idx.to(device))
    K = model.cfg.embed_dim
    ids_N = gather_rows(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device))
    return _result({m: (gather_rows(torch.cat(embs[m]) if embs[m] else torch.zeros(0, K, device=device)), ids_N)
                    for m, _ in runs}, modes)


@torch.no_grad()
def caption_retrieval(model, cs, tokenizer, *, dp_rank: int, dp_size: int, batch_size: int = 256,
                      modes: Modes = None) -> dict:
    """Image->text and text->image Recall@1/5/10 on a ``benchmarks.CaptionSet`` (several captions per
    image). Ranks embed disjoint parts of the images and of the captions; an image that could not be
    read is skipped and counted, and its captions leave the text->image queries. With ``modes``,
    {mode: metrics}, each image decoded once."""
    device = _device(model)
    images = embed_images(model, cs.iter_batches(image_size=model.cfg.image_size, batch_size=batch_size,
                                                 dp_rank=dp_rank, dp_size=dp_size), modes=modes)
    images = {"": images} if modes is None else images
    skipped = torch.tensor([float(_skipped(cs.skip_counts))], dtype=torch.float64, device=device)
    collectives.sum_(skipped, _group())
    results = {}
    for m, cf in _runs(modes):
        img_NK, image_id_N = images[m]
        txt_MK = embed_texts_split(model, tokenizer, cs.captions, dp_rank=dp_rank, dp_size=dp_size,
                                   batch_size=batch_size, capacity_factor=cf)
        position = torch.full((len(cs.images),), -1, dtype=torch.long, device=device)
        position[image_id_N] = torch.arange(len(image_id_N), device=device)
        target_M = position[torch.tensor(cs.image_of_caption, dtype=torch.long, device=device)]
        keep_M = target_M >= 0
        out: dict[str, float] = metrics.retrieval_metrics(img_NK, txt_MK[keep_M], image_of_caption_M=target_M[keep_M])
        results[m] = {**out, "images": len(image_id_N), "captions": int(keep_M.sum().item()),
                      "skipped_images": int(skipped.item())}
    return _result(results, modes)


@torch.no_grad()
def compositional(model, cs, tokenizer, *, dp_rank: int, dp_size: int, batch_size: int = 256,
                  modes: Modes = None) -> dict:
    """The compositional evaluation on a ``data.synthetic.CompositionalSet`` (held-out compositions,
    drawn on the fly): zero-shot colour x shape classification of the one-object scenes, the true
    caption against hard negatives that differ in one attribute or in the order, and retrieval among
    the scenes (``metrics.compositional_metrics``; docs/EVALUATION.md). Ranks embed disjoint parts of
    the images and of the texts (every distinct text once). With ``modes``, {mode: metrics}."""
    device = _device(model)
    images = embed_images(model, cs.iter_batches(image_size=model.cfg.image_size, batch_size=batch_size,
                                                 dp_rank=dp_rank, dp_size=dp_size), modes=modes)
    images = {"": images} if modes is None else images
    prompts = cs.prompts()  # [C][T]
    C, T = len(prompts), len(prompts[0])
    texts = list(dict.fromkeys([p for ps in prompts for p in ps] + cs.captions
                               + [t for negs in cs.negatives for _, t in negs]))
    row = {t: i for i, t in enumerate(texts)}
    N = len(cs.scenes)
    long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    caption_N = long([row[c] for c in cs.captions])
    kinds: dict[str, tuple[list[int], list[int]]] = {}
    for i, negs in enumerate(cs.negatives):
        for kind, text in negs:
            kinds.setdefault(kind, ([], []))
            kinds[kind][0].append(i)
            kinds[kind][1].append(row[text])
    negatives = {k: (long(ids), long(rows)) for k, (ids, rows) in kinds.items()}
    first: dict[str, int] = {}
    for i, c in enumerate(cs.captions):
        first.setdefault(c, i)
    colours = {c: k for k, c in enumerate(dict.fromkeys(n.split()[0] for n in cs.class_names))}
    shapes = {s: k for k, s in enumerate(dict.fromkeys(n.split()[1] for n in cs.class_names))}
    fixed = dict(labels_N=long([cs.label(i) for i in range(N)]), heldout_classes=cs.heldout_classes,
                 class_colour_C=long([colours[n.split()[0]] for n in cs.class_names]),
                 class_shape_C=long([shapes[n.split()[1]] for n in cs.class_names]), caption_N=caption_N,
                 negatives=negatives, negatives_per_image_N=long([len(n) for n in cs.negatives]),
                 retrieval_N=long(sorted(first.values())))
    results = {}
    for m, cf in _runs(modes):
        img_NK, ids_N = images[m]
        img_NK = img_NK[torch.argsort(ids_N)]  # scene order (gathered in rank order already)
        txt_MK = embed_texts_split(model, tokenizer, texts, dp_rank=dp_rank, dp_size=dp_size,
                                   batch_size=batch_size, capacity_factor=cf)
        classifier_CK = metrics.zero_shot_classifier(txt_MK[:C * T].view(C, T, -1))
        results[m] = {**metrics.compositional_metrics(img_NK, txt_MK, classifier_CK=classifier_CK, **fixed),
                      "scenes": N}
    return _result(results, modes)


def evaluate(model, *, val_loader=None, zero_shot_sets=(), retrieval_sets=(), compositional_sets=(), tokenizer=None,
             dp_rank: int = 0, dp_size: int = 1, max_batches: int = 0, zero_shot_max_images: int = 0,
             record: RoutingRecord | None = None) -> dict[str, float]:
    """All metrics, dropless and at the training capacity factor, keyed 'dropless/...' / 'train_cf/...'.

    ``zero_shot_sets``: ZeroShotSet / ClassFolderSet (keys .../zeroshot/NAME/...); ``retrieval_sets``:
    CaptionSet (keys .../retrieval/NAME/...); ``compositional_sets``: data.synthetic.CompositionalSet
    (keys .../compositional/NAME/...); ``record``: filled by the dropless validation pass.
    One walk over each dataset serves both modes."""
    was_training = model.training
    model.eval()
    modes = {"dropless": None}
    if model.cfg.any_moe is not None:
        modes["train_cf"] = model.cfg.any_moe.capacity_factor
    out: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    try:
        if val_loader is not None and model.cfg.classifier:
            for mode, res in classify_images(model, val_loader, max_batches=max_batches, record=record,
                                             modes=modes).items():
                out[mode].update({f"{mode}/val/{k}": v for k, v in res.items()})
        elif val_loader is not None:
            pairs_by_mode = embed_pairs(model, val_loader, max_batches=max_batches, record=record, modes=modes)
            for mode, (img, txt, loss, pairs) in pairs_by_mode.items():
                out[mode][f"{mode}/val/contrastive"] = loss
                out[mode][f"{mode}/val/pairs"] = pairs
                out[mode].update({f"{mode}/retrieval/{k}": v for k, v in metrics.retrieval_metrics(img, txt).items()})
        for zs in zero_shot_sets:
            for mode, res in zero_shot(model, zs, tokenizer, dp_rank=dp_rank, dp_size=dp_size, modes=modes,
                                       max_images=zero_shot_max_images).items():
                out[mode].update({f"{mode}/zeroshot/{zs.name}/{k}": v for k, v in res.items()})
        for cs in retrieval_sets:
            for mode, res in caption_retrieval(model, cs, tokenizer, dp_rank=dp_rank, dp_size=dp_size,
                                               modes=modes).items():
                out[mode].update({f"{mode}/retrieval/{cs.name}/{k}": v for k, v in res.items()})
        for cs in compositional_sets:
            for mode, res in compositional(model, cs, tokenizer, dp_rank=dp_rank, dp_size=dp_size,
                                           modes=modes).items():
                out[mode].update({f"{mode}/compositional/{cs.name}/{k}": v for k, v in res.items()})
    finally:
        model.train(was_training)
    return {k: v for mode in modes for k, v in out[mode].items()}
