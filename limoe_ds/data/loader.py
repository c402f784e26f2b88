"""The loaders the trainer calls: ``build_train_loader`` and ``build_eval_loader``.

Workers build whole batches (decode, crop, tokenise) and send them with their stream position and
the skip counts since their previous batch. The loader object in the training process records the
position of the last batch *it handed out* per worker, which is what ``state_dict`` saves.

Resume with workers: torch's DataLoader takes batches from workers strictly round-robin, starting
with worker slot 0. After k batches the next one belongs to logical worker k % W, so a restored
loader rotates roles: slot j plays logical worker (j + k) % W, each restarting at its own position.
Legend: B batch, H = W image size, L text_len.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from limoe_ds.config.data import DataConfig, SourceConfig
from limoe_ds.data.errors import DataError, zero_counts
from limoe_ds.data.image import to_tensor
from limoe_ds.data.render import PixelText
from limoe_ds.data.sources import ResolvedSource, resolve_source
from limoe_ds.data.stream import ReaderId, SampleSpec, SourcePos, WorkerStream
from limoe_ds.data.tokenizer import Tokenizer
from limoe_ds.runtime.proc import start_forkserver, worker_init

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _BatchStream(IterableDataset):
    """Batches of one rank; each DataLoader worker slot runs one logical reader."""

    def __init__(self, sources: list[ResolvedSource], spec: SampleSpec, *, tokenizer: Tokenizer, text_len: int,
                 batch_size: int, dp_rank: int, dp_size: int, num_workers: int, block_size: int,
                 states: list[dict | None], rotation: int) -> None:
        super().__init__()
        self.sources, self.spec, self.tokenizer, self.text_len = sources, spec, tokenizer, text_len
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.num_workers, self.block_size, self.states, self.rotation = num_workers, block_size, states, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        worker = (slot + self.rotation) % self.num_workers
        reader = ReaderId(self.dp_rank, self.dp_size, worker, self.num_workers)
        stream = WorkerStream(self.sources, reader, self.spec, block_size=self.block_size,
                              state=self.states[worker])
        yield from self._batches(stream, worker)

    def _batches(self, stream: WorkerStream, worker: int) -> Iterator[dict[str, Any]]:
        while True:
            images, captions = [], []
            while len(images) < self.batch_size and (sample := stream.next_sample()) is not None:
                images.append(sample[0])
                captions.append(sample[1])
            meta = {"worker": worker, "state": stream.state(), "counts": stream.take_counts()}
            if not images:
                if meta["counts"]:
                    yield {"_meta": meta}  # skips after the last sample still reach the counts
                return
            key = getattr(self.tokenizer, "batch_key", "tokens")  # a classifier's: "labels" (data.labels)
            if isinstance(self.tokenizer, PixelText):  # a CLIPPO renderer: missing glyphs, cut captions noted
                encoded = self.tokenizer.encode_batch(captions, self.text_len, notes=meta["counts"])
            else:
                encoded = self.tokenizer.encode_batch(captions, self.text_len)
            yield {"images": to_tensor(images), key: encoded, "_meta": meta}


def _one_line(e: Exception) -> str:
    """A worker's DataError arrives with its traceback in the message; keep the last line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return last.split("DataError: ", 1)[-1]


class _Loader:
    def __init__(self, cfg: DataConfig, sources: list[ResolvedSource], spec: SampleSpec, *, tokenizer: Tokenizer,
                 text_len: int, batch_size: int, dp_rank: int, dp_size: int) -> None:
        self.cfg, self.sources, self.spec, self.tokenizer = cfg, sources, spec, tokenizer
        self.text_len, self.batch_size, self.dp_rank, self.dp_size = text_len, batch_size, dp_rank, dp_size
        self.logical_workers = max(1, cfg.num_workers)
        self._counts = zero_counts()

    def _dataloader(self, states: list[dict | None], rotation: int) -> DataLoader:
        ds = _BatchStream(self.sources, self.spec, tokenizer=self.tokenizer, text_len=self.text_len,
                          batch_size=self.batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                          num_workers=self.logical_workers, block_size=self.cfg.shuffle_buffer,
                          states=states, rotation=rotation)
        # Workers come from a forkserver, not fork(): the trainer is multithreaded (gloo, DataLoader
        # feeder threads), and a child forked while another thread holds a lock can deadlock on its
        # first step (seen: an evaluation pass hung a 2-rank run at its 4th evaluation).
        # The server imports the data modules once; workers forked from it start in milliseconds.
        # The server and every worker die with this rank however it dies, and leave stop signals to
        # it (limoe_ds.runtime.proc): the guard module is preloaded first, before torch's slow import.
        multiprocessing.set_forkserver_preload(["limoe_ds.runtime.forkserver_guard", "torch", "limoe_ds.data.loader"])
        if self.cfg.num_workers > 0:
            start_forkserver()  # now, not by the first worker: guarded (runtime.proc)
        extra = ({"prefetch_factor": self.cfg.prefetch_factor, "multiprocessing_context": "forkserver",
                  "worker_init_fn": worker_init} if self.cfg.num_workers > 0 else {})
        # A private generator: otherwise iterating a DataLoader draws its base seed from torch's
        # global RNG, which the trainer's router noise uses, and a resumed run would drift.
        return DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.cfg.seed),
                          **extra)

    def _consume(self, dl: DataLoader) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """-> (batch, meta); meta-only items just add their counts."""
        it, error = iter(dl), None
        try:
            for batch in it:
                meta = batch.pop("_meta")
                for k, v in meta["counts"].items():
                    self._counts[k] += v
                if batch:
                    yield batch, meta
        except DataError as e:
            error = _one_line(e)
        finally:
            # Stop the workers now, not when the iterator is garbage-collected: after an error a
            # reference cycle can keep it alive until a later DataLoader's forked worker collects it.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if error is not None:
            raise DataError(error)

    def skip_counts(self) -> dict[str, int]:
        """reason -> count of records skipped (and captions truncated) in the batches handed out."""
        return dict(self._counts)


class TrainLoader(_Loader):
    """Endless training batches ``{"images": float32 [B, 3, H, W] in [-1, 1], "tokens": int64 [B, L]}``.

    Epochs roll over inside the stream (big_vision: repeat, shuffle, batch with drop_remainder), so
    every batch is full, a short epoch tail simply continues into the next epoch, and no rank can run
    out before another (no hang). Call ``state_dict()`` after the step that used the last batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._states: list[dict | None] = [None] * self.logical_workers
        self._batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Batch n always comes from logical worker n % W (see the module docstring).
        rotation = self._batches % self.logical_workers
        for batch, meta in self._consume(self._dataloader(list(self._states), rotation)):
            self._states[meta["worker"]] = meta["state"]
            self._batches += 1
            yield batch

    def _signature(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.logical_workers, "batch_size": self.batch_size,
                "shuffle_buffer": self.cfg.shuffle_buffer, "shards": [len(s.shards) for s in self.sources]}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able position: batches handed out, each worker's stream position, skip counts."""
        return {"version": STATE_VERSION, **self._signature(), "batches": self._batches,
                "workers": [dict(s) if s else None for s in self._states], "counts": dict(self._counts)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue exactly where the saved loader stopped (same data, seed, ranks, workers, batch),
        or, from :func:`epoch_start_state`, at the start of each source's next epoch."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"data state: version {d.get('version')!r} != {STATE_VERSION}; cannot resume")
        if d.get("kind") == "epoch_start":
            return self._start_at_epochs(d)
        self._check_signature(d, self._signature())
        self._batches = int(d["batches"])
        self._states = [dict(s) if s else None for s in d["workers"]]
        self._counts = {**zero_counts(), **d["counts"]}

    @staticmethod
    def _check_signature(d: dict[str, Any], want: dict[str, Any]) -> None:
        for key, value in want.items():
            if d.get(key) != value:
                raise ValueError(f"data state: {key} was {d.get(key)!r} when saved but is {value!r} now; "
                                 f"resume with the same {key} (or start the data stream afresh)")

    def _start_at_epochs(self, d: dict[str, Any]) -> None:
        sig = self._signature()
        self._check_signature(d, {key: sig[key] for key in ("seed", "shards")})
        start = [dataclasses.asdict(SourcePos(epoch=int(e))) for e in d["next_epochs"]]
        self._states = [{"draws": 0, "sources": [dict(p) for p in start]} for _ in range(self.logical_workers)]
        self._batches = 0
        self._counts = {**zero_counts(), **d["counts"]}

    @property
    def batches(self) -> int:
        return self._batches


def _begun(pos: dict[str, int]) -> bool:
    return any(pos[k] for k in ("block", "shard_pos", "record", "emitted", "good"))


def epoch_start_state(states: list[dict[str, Any]], dp_rank: int) -> dict[str, Any]:
    """A data position that any data-parallel layout can resume: from the saved loader states of
    EVERY data-parallel rank of a run, each source's first epoch that no reader had begun (the rest
    of the epoch in progress is skipped; nothing is read twice within an epoch's shuffle), and the
    run's skip counts (on new data-parallel rank 0 only: the counts are summed over ranks). Used
    when a checkpoint is resharded to another data-parallel size, where per-reader positions cannot
    carry over (each rank reads other shards and records)."""
    if not states or any(st.get("version") != STATE_VERSION or "workers" not in st for st in states):
        raise ValueError("epoch_start_state needs every data-parallel rank's saved loader state")
    first = states[0]
    num_sources = len(first["shards"])
    next_epochs = [0] * num_sources
    for st in states:
        for worker in st["workers"]:
            for s, pos in enumerate(worker["sources"] if worker else []):
                if pos is not None:
                    next_epochs[s] = max(next_epochs[s], pos["epoch"] + (1 if _begun(pos) else 0))
    counts = zero_counts()
    for st in states if dp_rank == 0 else []:
        for k, v in st["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return {"version": STATE_VERSION, "kind": "epoch_start", "seed": first["seed"], "shards": first["shards"],
            "next_epochs": next_epochs, "counts": counts}


class EvalLoader(_Loader):
    """One pass over the validation data per iteration: no shuffle, centre crop, every sample once.

    The last batch of each worker may be partial (kept). Ranks may get different batch counts, so
    gather evaluation results once at the end, not per batch.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._counts = zero_counts()
        n = 0
        for batch, _ in self._consume(self._dataloader([None] * self.logical_workers, 0)):
            n += batch["images"].shape[0]
            yield batch
        if n == 0:
            raise DataError(f"data.val: rank {self.dp_rank}/{self.dp_size} got no usable sample from "
                            f"{self.sources[0].shards[0]!r} ({len(self.sources[0].shards)} shards; skipped: "
                            f"{ {k: v for k, v in self._counts.items() if v} }); "
                            f"check the data or use fewer ranks/workers")


def _check_args(image_size: int, text_len: int, batch_size: int, dp_rank: int, dp_size: int) -> None:
    for key, v in (("image_size", image_size), ("text_len", text_len), ("batch_size", batch_size),
                   ("dp_size", dp_size)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{key}: must be a positive int, got {v!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")


def _spec(cfg: DataConfig, image_size: int, train: bool, tokenizer) -> SampleSpec:
    return SampleSpec(image_size=image_size, train=train, seed=cfg.seed, max_pixels=cfg.max_image_pixels,
                      max_caption_chars=cfg.max_caption_chars, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
                      labels=getattr(tokenizer, "batch_key", "tokens") == "labels")


def _resolve(cfg: DataConfig, src: SourceConfig, index: int, key: str, *, train: bool = True) -> ResolvedSource:
    return resolve_source(src, index, key, cfg.caption_key, cfg.image_key, train=train)


def build_train_loader(cfg: DataConfig, *, image_size: int, tokenizer: Tokenizer, text_len: int, batch_size: int,
                       dp_rank: int, dp_size: int) -> TrainLoader:
    """Endless, shuffled, resumable training batches for data-parallel rank ``dp_rank`` of ``dp_size``."""
    _check_args(image_size, text_len, batch_size, dp_rank, dp_size)
    if not cfg.train:
        raise DataError("data.train: no training source; add at least one path")
    sources = [_resolve(cfg, s, i, f"data.train[{i}]") for i, s in enumerate(cfg.train)]
    return TrainLoader(cfg, sources, _spec(cfg, image_size, True, tokenizer), tokenizer=tokenizer, text_len=text_len,
                       batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size)


def build_eval_loader(cfg: DataConfig, *, image_size: int, tokenizer: Tokenizer, text_len: int, batch_size: int,
                      dp_rank: int, dp_size: int) -> EvalLoader:
    """The validation split (``cfg.val``): one deterministic pass per iteration, last batch kept."""
    _check_args(image_size, text_len, batch_size, dp_rank, dp_size)
    if cfg.val is None:
        raise DataError("data.val: no validation source; set data.val to a path")
    sources = [_resolve(cfg, cfg.val, 0, "data.val", train=False)]
    return EvalLoader(cfg, sources, _spec(cfg, image_size, False, tokenizer), tokenizer=tokenizer, text_len=text_len,
                      batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size)


__all__ = ["TrainLoader", "EvalLoader", "build_train_loader", "build_eval_loader", "epoch_start_state",
           "STATE_VERSION"]
