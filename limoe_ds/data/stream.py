"""Deterministic, resumable sample streams: who reads which shard, block shuffle, source mixing.

Every random choice is a pure function of (seed, epoch, rank, worker, position), so a stream can be
rebuilt at any saved position and continues exactly as an uninterrupted run would have:

* shard order: a permutation seeded by (seed, source, epoch) (identity for evaluation);
* split: ranks, then the workers of a rank, take whole shards when the counts divide; otherwise the
  remainder is split by record striding (record i of a shard goes to reader i mod stride), so
  readers stay disjoint and together complete (``assign``);
* shuffle: a *block* shuffle. A reader fills a block of ``shuffle_buffer`` raw records, permutes it
  with an rng seeded by (seed, source, epoch, rank, worker, block) and hands it out. The position is
  (epoch, block, where the block starts, how many of it were handed out): restoring re-reads one
  block, not the epoch (a sliding buffer would need the whole epoch replayed);
* mixing: source ``s`` for draw ``d`` comes from an rng seeded by (seed, rank, worker, d // 4096).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator

import numpy as np

from limoe_ds.data.errors import DataError, SkipSample, zero_counts
from limoe_ds.data.image import eval_transform, train_transform
from limoe_ds.data.samples import decode_labelled, decode_record
from limoe_ds.data.sources import Record, ResolvedSource, read_shard

log = logging.getLogger(__name__)

# Tags that keep the rng streams for different purposes apart.
_ORDER, _BLOCK, _MIX, _CROP = 1, 2, 3, 4
_MIX_CHUNK = 4096
_LOG_FIRST = 3  # skipped samples logged per reason and worker; the rest are only counted


@dataclass(frozen=True)
class ReaderId:
    """One reader: a DataLoader worker of a data-parallel rank (tensor-parallel peers share it)."""

    rank: int
    dp_size: int
    worker: int
    num_workers: int


@dataclass(frozen=True)
class Assignment:
    shards: tuple[int, ...]
    """Shard ids, in reading order."""
    stride: int
    phase: int
    """Record i of each shard is this reader's iff i % stride == phase."""


def shard_order(num_shards: int, seed: int, source: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, _ORDER, source, epoch]).permutation(num_shards).tolist()


def _split(items: list[int], parts: int, part: int) -> tuple[list[int], int, int]:
    """Give ``part`` of ``parts`` whole items when they divide, else stride the remainder.

    g = gcd(len, parts) groups each take len/g whole items; the parts/g members of a group share
    them by record striding. -> (items, stride, phase).
    """
    g = math.gcd(len(items), parts)
    return items[part % g:: g], parts // g, part // g


def assign(order: list[int], reader: ReaderId) -> Assignment:
    """Ranks first, then workers within the rank (so rank splits are whole-shard when they can be)."""
    rank_shards, s1, p1 = _split(order, reader.dp_size, reader.rank)
    shards, s2, p2 = _split(rank_shards, reader.num_workers, reader.worker)
    # idx % s1 == p1 picks the rank's records; of those (idx // s1) % s2 == p2 picks the worker's.
    return Assignment(tuple(shards), s1 * s2, p1 + s1 * p2)


@dataclass
class SourcePos:
    """Where a reader is in one source; plain ints so a checkpoint can hold it as JSON."""

    epoch: int = 0
    block: int = 0
    shard_pos: int = 0
    """Index into the epoch's assigned shard list where the current block starts."""
    record: int = 0
    """Record index within that shard where the current block starts."""
    emitted: int = 0
    """Records of the current block already handed out."""
    good: int = 0
    """Usable samples handed out in the current epoch (an epoch without any is an error)."""


@dataclass
class Item:
    source: int
    epoch: int
    shard: int
    record: Record


class SourceStream:
    """The block-shuffled record stream of one source for one reader, from a position."""

    def __init__(self, src: ResolvedSource, reader: ReaderId, *, seed: int, block_size: int, shuffle: bool,
                 endless: bool, pos: SourcePos | None = None) -> None:
        self.src, self.reader, self.seed = src, reader, seed
        self.block_size, self.shuffle, self.endless = block_size, shuffle, endless
        self.pos = dataclasses.replace(pos) if pos is not None else SourcePos()
        self._items: list[Item] = []
        self._skip = self.pos.emitted
        self._done = False
        self._blocks = self._iter_blocks(self.pos.epoch, self.pos.block, self.pos.shard_pos, self.pos.record)

    def assignment(self, epoch: int) -> Assignment:
        order = shard_order(len(self.src.shards), self.seed, self.src.index, epoch, self.shuffle)
        return assign(order, self.reader)

    def _records(self, asg: Assignment, shard_pos: int, record: int,
                 epoch: int) -> Iterator[tuple[int, int, int, Record]]:
        """-> (shard_pos, record) where the *next* read would start, shard id, record."""
        keep = lambda i: i % asg.stride == asg.phase  # noqa: E731
        for pos in range(shard_pos, len(asg.shards)):
            shard = asg.shards[pos]
            start = record if pos == shard_pos else 0
            for rec in read_shard(self.src, self.src.shards[shard], start, keep, count_failure=asg.phase == 0,
                                  epoch=epoch):
                nxt = (pos + 1, 0) if rec.index < 0 else (pos, rec.index + 1)
                yield nxt[0], nxt[1], shard, rec

    def _iter_blocks(self, epoch: int, block: int, shard_pos: int, record: int) -> Iterator[tuple]:
        """-> ("block", epoch, block, (shard_pos, record), items) ... ("end", epoch), epoch after epoch."""
        while True:
            it = self._records(self.assignment(epoch), shard_pos, record, epoch)
            while chunk := list(islice(it, self.block_size)):
                items = [Item(self.src.index, epoch, shard, rec) for _, _, shard, rec in chunk]
                yield "block", epoch, block, (shard_pos, record), self._permute(items, epoch, block)
                block, (shard_pos, record) = block + 1, chunk[-1][:2]
            yield "end", epoch
            if not self.endless:
                return
            epoch, block, shard_pos, record = epoch + 1, 0, 0, 0

    def _permute(self, items: list[Item], epoch: int, block: int) -> list[Item]:
        if not self.shuffle:
            return items
        r = self.reader
        perm = np.random.default_rng([self.seed, _BLOCK, self.src.index, epoch, r.rank, r.worker, block])
        return [items[i] for i in perm.permutation(len(items))]

    def next(self) -> Item | None:
        """The next raw item, or None at the end of a finite (evaluation) stream."""
        while not self._done and (self.pos.emitted >= len(self._items) or self._skip):
            event = next(self._blocks)
            if event[0] == "end":
                self._items = []
                self._done = self._end_epoch()
                continue
            _, epoch, block, (shard_pos, record), self._items = event
            self.pos = SourcePos(epoch, block, shard_pos, record, min(self._skip, len(self._items)),
                                 self.pos.good if epoch == self.pos.epoch else 0)
            self._skip = 0
        if self._done:
            return None
        item = self._items[self.pos.emitted]
        self.pos.emitted += 1
        return item

    def _end_epoch(self) -> bool:
        """Check the finished epoch; True when the stream ends here (evaluation)."""
        if self.endless and self.pos.good == 0:
            raise DataError(f"{self.src.name}: no usable sample in epoch {self.pos.epoch} for rank "
                            f"{self.reader.rank}/{self.reader.dp_size} worker {self.reader.worker}/"
                            f"{self.reader.num_workers} ({len(self.src.shards)} shards, first "
                            f"{self.src.shards[0]!r}); see skip_counts(), or use fewer workers/ranks")
        self.pos = SourcePos(self.pos.epoch + 1)
        return not self.endless


class Mixer:
    """Draws items from several source streams with fixed weights, deterministically by draw index."""

    def __init__(self, streams: list[SourceStream], weights: list[float], *, seed: int, reader: ReaderId,
                 draws: int = 0) -> None:
        self.streams, self.seed, self.reader, self.draws = streams, seed, reader, draws
        p = np.asarray(weights, dtype=np.float64)
        self.p = p / p.sum()
        self._chunk: tuple[int, np.ndarray] | None = None

    def _choice(self, d: int) -> int:
        c = d // _MIX_CHUNK
        if self._chunk is None or self._chunk[0] != c:
            rng = np.random.default_rng([self.seed, _MIX, self.reader.rank, self.reader.worker, c])
            self._chunk = (c, rng.choice(len(self.p), size=_MIX_CHUNK, p=self.p))
        return int(self._chunk[1][d % _MIX_CHUNK])

    def next(self) -> Item | None:
        s = self._choice(self.draws) if len(self.streams) > 1 else 0
        self.draws += 1
        return self.streams[s].next()


@dataclass(frozen=True)
class SampleSpec:
    """What a worker turns records into."""

    image_size: int
    train: bool
    seed: int
    max_pixels: int
    max_caption_chars: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    labels: bool = False
    """A classifier's stream (V-MoE): samples are (image, integer label), not (image, caption)."""


class WorkerStream:
    """Usable (image, caption) samples for one reader; every skipped record is counted."""

    def __init__(self, sources: list[ResolvedSource], reader: ReaderId, spec: SampleSpec, *, block_size: int,
                 state: dict[str, Any] | None = None) -> None:
        state = state or {"draws": 0, "sources": [None] * len(sources)}
        self.spec, self.reader = spec, reader
        self.streams = [SourceStream(s, reader, seed=spec.seed, block_size=block_size, shuffle=spec.train,
                                     endless=spec.train, pos=SourcePos(**p) if p else None)
                        for s, p in zip(sources, state["sources"])]
        self.mixer = Mixer(self.streams, [s.weight for s in sources], seed=spec.seed, reader=reader,
                           draws=state["draws"])
        self.counts = zero_counts()
        self._logged = zero_counts()

    def state(self) -> dict[str, Any]:
        return {"draws": self.mixer.draws, "sources": [dataclasses.asdict(s.pos) for s in self.streams]}

    def take_counts(self) -> dict[str, int]:
        out, self.counts = {k: v for k, v in self.counts.items() if v}, zero_counts()
        return out

    def next_sample(self) -> tuple[np.ndarray, str | int] | None:
        """-> (uint8 [H, W, 3], caption or, with ``spec.labels``, label), or None at the end of an
        evaluation stream."""
        while (item := self.mixer.next()) is not None:
            try:
                sample = self._decode(item)
            except SkipSample as e:
                self._count(e.reason, item, str(e))
                self.counts["samples_lost"] += item.record.lost
                continue
            self.streams[item.source].pos.good += 1
            return sample
        return None

    def _decode(self, item: Item) -> tuple[np.ndarray, str | int]:
        spec = self.spec
        if spec.labels:
            img, caption = decode_labelled(item.record, max_pixels=spec.max_pixels)
        else:
            img, caption, truncated = decode_record(item.record, max_pixels=spec.max_pixels,
                                                    max_caption_chars=spec.max_caption_chars)
            if truncated:
                self._count("caption_truncated", item, f"cut to {spec.max_caption_chars} characters")
        if not spec.train:
            return eval_transform(img, spec.image_size), caption
        rng = np.random.default_rng([spec.seed, _CROP, item.source, item.epoch, item.shard, item.record.index])
        return train_transform(img, spec.image_size, rng, spec.crop_scale, spec.crop_ratio), caption

    def _count(self, reason: str, item: Item, detail: str) -> None:
        self.counts[reason] += 1
        self._logged[reason] += 1
        if reason == "damaged_shard":
            return  # read_shard already logged its one line (shard, offset, samples lost)
        if self._logged[reason] <= _LOG_FIRST:
            src = self.streams[item.source].src
            where = item.record.key if item.record.index < 0 else f"{src.shards[item.shard]}:{item.record.key}"
            log.warning("data: %s %s (%s)%s", reason, where, detail,
                        " [further ones only counted]" if self._logged[reason] == _LOG_FIRST else "")


__all__ = ["ReaderId", "Assignment", "shard_order", "assign", "SourcePos", "SourceStream", "Mixer",
           "SampleSpec", "WorkerStream"]
