"""Shard discovery and the raw record readers (no image decoding here).

A *shard* is the unit that is split among ranks and workers: one tar, one parquet/arrow file, or one
image folder (its captions file). A reader yields ``Record``s in file order, numbering every record
of the shard (``index``), so a position (shard, index) means the same record on every run.
Problems that are visible without decoding are marked on the record (``problem``); a shard that is
missing or breaks while being read yields one record with problem ``unreadable_shard``, so it is
counted when the stream reaches it, exactly once per pass, like any other skipped sample. A tar that
*stops short* without an error (``tarfile`` takes the first bad header for the end of the archive) is
found by looking at what follows the point where reading stopped, and by comparing the samples read
with the shard's index where one exists (img2dataset's ``NNNNN_stats.json``, the bundled
``manifest.json``); it yields one record with problem ``damaged_shard`` carrying the samples lost.
No resync after the damage: see ``_tar_end``.

WebDataset tars are read with ``tarfile`` rather than ``datasets``' webdataset builder: that builder
decodes ``.txt`` as UTF-8 and ``.json`` inside its generator, raises on a repeated field, and infers
the schema from the first five samples, so one bad sample ends the whole stream. Parquet/Arrow go
through ``datasets`` streaming, with any Image feature cast to ``Image(decode=False)``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

from PIL import Image

from limoe_ds.config.data import SourceConfig, SyntheticConfig, is_synthetic
from limoe_ds.data.errors import DataError
from limoe_ds.data.image import IMAGE_EXTS

log = logging.getLogger(__name__)

TAR_EXTS = (".tar", ".tar.gz", ".tgz")
CAPTION_EXTS = ("txt", "text", "caption")
JSON_EXTS = ("json",)
LABEL_EXTS = ("cls",)
_EXT_FORMAT = {".tar": "webdataset", ".tgz": "webdataset", ".gz": "webdataset", ".parquet": "parquet",
               ".arrow": "arrow"}


@dataclass
class Record:
    """One raw sample: undecoded image bytes and caption (bytes or str), plus what is already wrong."""

    key: str
    index: int
    image: bytes | None = None
    caption: bytes | str | None = None
    label: int | None = None
    problem: str | None = None
    """A SKIP_REASONS entry known before decoding (duplicate_key, missing_image, ...), else None."""
    detail: str = ""
    lost: int = 0
    """damaged_shard / unreadable_shard only: samples the shard's index promised that were not read."""
    render: Callable[[], tuple[Image.Image, str]] | None = None
    """A procedural record (``data/synthetic.py``): draws (RGB image, caption) when it is decoded, so
    neither pixels nor PNG bytes wait in a shuffle block; ``image`` and ``caption`` stay None."""


@dataclass(frozen=True)
class ResolvedSource:
    """A source with its shard list fixed (sorted) at build time, so every rank sees the same list."""

    index: int
    name: str
    shards: tuple[str, ...]
    format: str
    weight: float
    caption_key: str
    image_key: str | None
    captions_file: str | None
    synthetic: SyntheticConfig | None = None
    """format synthetic: the options, ``split`` resolved (train for training, val for evaluation)."""


# ---------------------------------------------------------------------------------------------
# Resolving paths
# ---------------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """``a-{000..003}.tar`` -> a-000.tar ... a-003.tar (zero padding kept); ``{x,y}`` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


_FORMAT_EXTS = {"webdataset": TAR_EXTS, "parquet": (".parquet",), "arrow": (".arrow",)}


def _tar_stem(name: str) -> str | None:
    return next((name[: -len(e)] for e in TAR_EXTS if name.endswith(e)), None)


def _shards_in_dir(path: str, fmt: str = "auto") -> list[str]:
    """A directory's shards of ``fmt`` (auto: every kind). img2dataset writes ``NNNNN.tar`` with a
    metadata ``NNNNN.parquet`` (no images) and ``NNNNN_stats.json`` beside it: a parquet/arrow file
    whose stem is also a tar's is that metadata, never a shard."""
    names = os.listdir(path)
    exts = _FORMAT_EXTS.get(fmt, TAR_EXTS + (".parquet", ".arrow"))
    tar_stems = {_tar_stem(f) for f in names} - {None}
    meta = {f for f in names if f.endswith((".parquet", ".arrow")) and os.path.splitext(f)[0] in tar_stems}
    if fmt == "auto" and meta:
        log.info("%s: %d .parquet/.arrow file(s) beside tars of the same name are img2dataset metadata; "
                 "reading the tars", path, len(meta))
    return sorted(os.path.join(path, f) for f in names if f.endswith(exts) and (fmt != "auto" or f not in meta))


def _captions_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".csv")))


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_path(entry: str) -> list[str]:
    """One configured path -> the paths it names: braces expanded, a glob matched (existing files,
    sorted), anything else as written (it may not exist). The config's existence check uses it;
    ``resolve_paths`` applies the same two rules and lists directories' shards."""
    return [q for pattern in expand_braces(entry)
            for q in (sorted(glob.glob(pattern)) if _is_glob(pattern) else [pattern])]


def resolve_paths(src: SourceConfig, key: str) -> list[str]:
    """Expand braces, globs and directories; explicit files are kept even if missing (counted later)."""
    out: list[str] = []
    for entry in src.paths:
        for pattern in expand_braces(entry):
            if _is_glob(pattern):
                out.extend(expand_path(pattern))
            elif os.path.isdir(pattern) and src.format not in ("folder", "auto"):
                out.extend(_shards_in_dir(pattern, src.format))
            elif os.path.isdir(pattern) and src.format == "auto" and not _captions_files(pattern):
                out.extend(_shards_in_dir(pattern))
            else:
                out.append(pattern)
    if not out:
        raise DataError(f"{key}.path: no files match {src.path!r}; check the path or glob")
    if not any(os.path.exists(p) for p in out):
        raise DataError(f"{key}.path: none of the {len(out)} file(s) from {src.path!r} exist "
                        f"(first: {out[0]!r}); build or mount the data first")
    return out


def _format_of(path: str, key: str) -> str:
    if os.path.isdir(path):
        return "folder"
    for ext, fmt in _EXT_FORMAT.items():
        if path.endswith(ext) and (ext != ".gz" or path.endswith(".tar.gz")):
            return fmt
    raise ValueError(f"{key}.format: cannot infer the format of {path!r}; set format to one of "
                     "webdataset, parquet, arrow, folder")


def infer_format(paths: list[str], key: str) -> str:
    """The one format of every path (inferred per file); a mix is refused: one source, one reader."""
    formats = {}
    for p in paths:
        formats.setdefault(_format_of(p, key), p)
    if len(formats) > 1:
        (f1, p1), (f2, p2) = sorted(formats.items())[:2]
        raise ValueError(f"{key}.path: mixes {f1} ({p1!r}) and {f2} ({p2!r}) files; a source reads one "
                         "format: give each kind its own source (a glob such as DIR/*.tar) or set format")
    return next(iter(formats))


def resolve_source(src: SourceConfig, index: int, key: str, caption_key: str, image_key: str, *,
                   train: bool = True) -> ResolvedSource:
    """``train``: a training source (a procedural one then draws its train split by default)."""
    if any(is_synthetic(p) for p in src.paths):
        return _resolve_synthetic(src, index, key, train)
    paths = resolve_paths(src, key)
    fmt = src.format if src.format != "auto" else infer_format(paths, key)
    if fmt == "folder" and len(paths) != 1:
        raise ValueError(f"{key}.path: a folder source is one directory, got {len(paths)} paths; "
                         "list several folders as separate sources")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        log.warning("%s: %d of %d shards missing (first %s); they are counted as unreadable_shard",
                    key, len(missing), len(paths), missing[0])
    img_key = src.image_key or ("file_name" if fmt == "folder" else image_key)
    return ResolvedSource(index=index, name=key, shards=tuple(paths), format=fmt, weight=src.weight,
                          caption_key=src.caption_key or caption_key, image_key=img_key,
                          captions_file=src.captions_file)


def _resolve_synthetic(src: SourceConfig, index: int, key: str, train: bool) -> ResolvedSource:
    from limoe_ds.data import synthetic
    cfg = src.synthetic or SyntheticConfig()
    cfg = dataclasses.replace(cfg, split=cfg.split or ("train" if train else "val"))
    name = src.paths[0]
    return ResolvedSource(index=index, name=key, shards=synthetic.shard_names(name, cfg), format="synthetic",
                          weight=src.weight, caption_key="caption", image_key=None, captions_file=None,
                          synthetic=cfg)


# ---------------------------------------------------------------------------------------------
# Readers: read_shard(source, shard_path, start, keep) -> records with index >= start and keep(index)
# ---------------------------------------------------------------------------------------------

Keep = Callable[[int], bool]


@dataclass
class _Progress:
    """What a reader got through: ``records`` of the shard, in file order (read or seeked over)."""

    records: int = 0
    damage: str | None = None
    """Set by the tar reader when the archive stopped before the true end of the file."""


def read_shard(src: ResolvedSource, path: str, start: int, keep: Keep, *, count_failure: bool,
               epoch: int = 0) -> Iterator[Record]:
    """Yield the shard's records from ``start``; a failure becomes one unreadable_shard record, a tar
    that stops short (or holds fewer samples than its index) one damaged_shard record.

    ``count_failure``: only one of the readers sharing a shard (record striding) reports its failure,
    so each is counted and logged once per shard and pass. ``epoch``: only a procedural source's
    virtual shards read it (each epoch holds new scenes); files are the same every epoch.
    """
    if src.format == "synthetic":
        yield from _read_synthetic(src, path, start, keep, epoch)
        return
    reader = {"webdataset": _read_tar, "parquet": _read_hf, "arrow": _read_hf, "folder": _read_folder}[src.format]
    last = start - 1
    prog = _Progress()
    try:
        for rec in reader(src, path, start, keep, prog):
            last = rec.index
            yield rec
    except Exception as e:  # a missing, unreadable or truncated shard must not end the stream
        lost = _lost(src, path, prog)
        log.warning("unreadable shard %s (%s: %s); records after #%d are lost%s", path, type(e).__name__, e, last,
                    f" ({lost} samples by its index)" if lost else "")
        if count_failure:
            yield Record(key=path, index=-1, problem="unreadable_shard", detail=f"{type(e).__name__}: {e}",
                         lost=lost or 0)
        return
    expected = expected_samples(path) if src.format == "webdataset" else None
    damage = prog.damage
    if damage is None and expected is not None and prog.records < expected:
        damage = f"ends after {prog.records} samples"
    if damage is not None and count_failure:
        lost = _lost(src, path, prog)
        log.warning("data: damaged_shard %s: %s; %s", path, damage,
                    "an unknown number of samples lost (no index: NNNNN_stats.json or manifest.json)"
                    if lost is None else f"{lost} of the {expected} samples its index records are lost")
        yield Record(key=path, index=-1, problem="damaged_shard", detail=damage, lost=lost or 0)


def _read_synthetic(src: ResolvedSource, path: str, start: int, keep: Keep, epoch: int) -> Iterator[Record]:
    """Virtual shard ``path`` of ``epoch``: record i is scene ``shard_range(...)[i]``, drawn on decode."""
    from limoe_ds.data import synthetic
    cfg = src.synthetic
    indices = synthetic.shard_range(cfg, synthetic.shard_of(path), epoch)
    for i in range(start, len(indices)):
        if keep(i):
            yield Record(key=f"{cfg.split}-{indices[i]}", index=i,
                         render=functools.partial(synthetic.draw, cfg, indices[i]))


def _lost(src: ResolvedSource, path: str, prog: _Progress) -> int | None:
    """Samples the shard's index promised beyond those read; None where no count is known."""
    expected = expected_samples(path) if src.format == "webdataset" else None
    return None if expected is None else max(0, expected - prog.records)


@lru_cache(maxsize=256)
def _load_json(path: str, version: tuple[int, int]) -> Any:
    """``version`` (mtime_ns, size) keys the cache, so a rewritten index is read again."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s: not readable as JSON (%s); its sample counts are not used", path, e)
        return None


def _json_at(path: str) -> Any:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _load_json(path, (st.st_mtime_ns, st.st_size))


def expected_samples(path: str) -> int | None:
    """How many samples the tar at ``path`` should hold, where an index says so, else None:
    img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar`` ("successes": the samples it wrote),
    or a ``manifest.json`` in the shard's folder or the one above listing the shard
    (tools/build_mini_dataset.py: ``shard_samples``, or ``num_samples`` dealt round-robin)."""
    stem = _tar_stem(path)
    if stem is None:
        return None
    stats = _json_at(stem + "_stats.json")
    if isinstance(stats, dict) and isinstance(stats.get("successes"), int) and stats["successes"] >= 0:
        return stats["successes"]
    shard = os.path.abspath(path)
    for root in (os.path.dirname(shard), os.path.dirname(os.path.dirname(shard))):
        manifest = _json_at(os.path.join(root, "manifest.json"))
        if isinstance(manifest, dict):
            count = _manifest_count(manifest, os.path.relpath(shard, root))
            if count is not None:
                return count
    return None


def _manifest_count(manifest: dict[str, Any], rel: str) -> int | None:
    for split in manifest.values():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or rel not in shards:
            continue
        s, n = shards.index(rel), len(shards)
        per_shard, total = split.get("shard_samples"), split.get("num_samples")
        if isinstance(per_shard, list) and len(per_shard) == n and isinstance(per_shard[s], int):
            return per_shard[s]
        if isinstance(total, int):  # the builder deals samples round-robin: shard s holds s, s + n, ...
            return len(range(s, total, n))
    return None


def split_member(name: str) -> tuple[str | None, str]:
    """WebDataset convention: key = path up to the first dot of the basename, field = the rest."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _tar_groups(tar: tarfile.TarFile, blobs: dict[tarfile.TarInfo, bytes] | None = None
                ) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members with the same key; a repeated field starts a new group (a duplicate).
    A header that cannot be read still lets the group before it out first (then the error).

    ``blobs``: read every member's bytes as its header is passed (a compressed tar: reading a member
    after the next header means seeking back, and a gzip stream seeks back by decompressing again
    from the start: 914 rewinds and 20 s for one 1,491-sample .tar.gz shard instead of 0.1 s)."""
    key, group = None, {}
    members = iter(tar)
    while True:
        try:
            member = next(members)
            wanted = member.isfile()
            if wanted and blobs is not None:
                blobs[member] = tar.extractfile(member).read()
        except StopIteration:
            break
        except Exception:
            if group:
                yield key, group
            raise
        if not wanted:
            continue
        k, field = split_member(member.name)
        if k is None or os.path.basename(k).startswith("."):
            continue
        if group and (k != key or field in group):
            yield key, group
            for m in group.values() if blobs is not None else ():
                del blobs[m]
            group = {}
        key = k
        group[field] = member
    if group:
        yield key, group


def _read_tar(src: ResolvedSource, path: str, start: int, keep: Keep, prog: _Progress) -> Iterator[Record]:
    seen: set[str] = set()
    with tarfile.open(path, mode="r:*") as tar:
        blobs = None if type(tar.fileobj) is io.BufferedReader else {}  # compressed: read in passing
        for index, (key, group) in enumerate(_tar_groups(tar, blobs)):
            duplicate = key in seen
            seen.add(key)
            if index < start or not keep(index):
                prog.records = index + 1
                continue  # members are seeked over, never read
            if duplicate:
                rec = Record(key=key, index=index, problem="duplicate_key", detail=path)
            else:
                rec = _tar_record(src, tar, key, index, group, blobs)
            prog.records = index + 1
            yield rec
        prog.damage = _tar_end(tar)


_CHUNK = 1 << 16


def _tar_end(tar: tarfile.TarFile) -> str | None:
    """None when the archive really ended where tarfile stopped, else where and how it stopped short.

    tarfile stops silently at the first header it cannot parse, taking it for the end of the archive.
    A complete tar has two zero blocks there and nothing after them but zero padding. Fewer than two
    blocks left: the file was cut (a ReadError, as a cut member is: unreadable_shard). Non-zero bytes:
    a bad header in the middle, or data after the end marker (damaged_shard). Members after the
    damage are not searched for (no resync): a 512-byte block that passes the header checksum can
    sit inside member data (a tar stored in a tar), which would invent records, and a damaged shard
    needs to be fetched again anyway; the loss is counted and named instead. Works on .tar.gz too
    (the decompressed stream is read on from the stop point)."""
    f, offset = tar.fileobj, tar.offset
    f.seek(offset)
    marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated: no end-of-archive marker after byte {offset}")
    if marker.count(0) != len(marker):
        return f"bad tar header at byte {offset}"
    pos = offset + len(marker)
    while chunk := f.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            return f"data after the end-of-archive marker at byte {pos + len(chunk) - len(chunk.lstrip(bytes(1)))}"
        pos += len(chunk)
    return None


def _tar_record(src: ResolvedSource, tar: tarfile.TarFile, key: str, index: int,
                group: dict[str, tarfile.TarInfo], blobs: dict[tarfile.TarInfo, bytes] | None) -> Record:
    read = (lambda m: tar.extractfile(m).read()) if blobs is None else blobs.__getitem__
    rec = Record(key=key, index=index)
    last_ext = {field.rsplit(".", 1)[-1]: field for field in group}
    img_field = next((last_ext[e] for e in IMAGE_EXTS if e in last_ext), None)
    if img_field is not None:
        rec.image = read(group[img_field])
    if "cls" in last_ext:
        rec.label = _parse_label(read(group[last_ext["cls"]]))
    txt = next((last_ext[e] for e in CAPTION_EXTS if e in last_ext), None)
    if txt is not None:
        rec.caption = read(group[txt])
    elif "json" in last_ext:
        rec.caption, rec.problem = _json_caption(read(group[last_ext["json"]]), src.caption_key)
    if img_field is None:
        known = set(IMAGE_EXTS + CAPTION_EXTS + JSON_EXTS + LABEL_EXTS)
        others = sorted(e for e in last_ext if e not in known)
        rec.problem = "unsupported_format" if others else "missing_image"
        rec.detail = ",".join(others)
    return rec


def _parse_label(raw: bytes) -> int | None:
    try:
        return int(raw.decode("ascii").strip())
    except ValueError:
        return None


def _json_caption(raw: bytes, caption_key: str) -> tuple[bytes | str | None, str | None]:
    """-> (caption, problem). Non-UTF-8 JSON is a non_utf8_caption, left for the caption check."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw, None
    try:
        obj = json.loads(text)
    except ValueError:
        return None, "malformed_json"
    if not isinstance(obj, dict):
        return None, "malformed_json"
    return _pick_caption(obj.get(caption_key))


def _pick_caption(value: Any) -> tuple[bytes | str | None, str | None]:
    if isinstance(value, list):  # several captions per image (e.g. COCO): the first, deterministically
        value = value[0] if value else None
    if value is None:
        return None, None
    if isinstance(value, (str, bytes)):
        return value, None
    return str(value), None


def _row_key(row: dict[str, Any], index: int) -> str:
    for col in ("__key__", "key"):
        if row.get(col) is not None:
            return str(row[col])
    return f"#{index}"


def _image_cell(value: Any) -> bytes | None:
    """A bytes column, or the {bytes, path} struct of a datasets Image(decode=False) column."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def _read_hf(src: ResolvedSource, path: str, start: int, keep: Keep, prog: _Progress) -> Iterator[Record]:
    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    ds = datasets.load_dataset(src.format, data_files=[path], split="train", streaming=True)
    features = ds.features or {}
    if isinstance(features.get(src.image_key), datasets.Image):
        ds = ds.cast_column(src.image_key, datasets.Image(decode=False))
    seen: set[str] = set()
    for index, row in enumerate(_rows(ds)):
        key = _row_key(row, index)
        duplicate = key in seen and not key.startswith("#")
        seen.add(key)
        prog.records = index + 1
        if index < start or not keep(index):
            continue
        yield _hf_record(src, row, key, index, duplicate)


def _rows(ds: Any, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Rows of a streaming dataset. ``ds.iter`` rather than ``iter(ds)``: inside a DataLoader worker
    the latter splits the shards among the workers itself, on top of our own split."""
    for batch in ds.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _hf_record(src: ResolvedSource, row: dict[str, Any], key: str, index: int, duplicate: bool) -> Record:
    if duplicate:
        return Record(key=key, index=index, problem="duplicate_key")
    caption, problem = _pick_caption(row.get(src.caption_key))
    rec = Record(key=key, index=index, image=_image_cell(row.get(src.image_key)), caption=caption,
                 problem=problem)
    if rec.image is None:
        rec.problem = "missing_image"
    if isinstance(row.get("label"), int):
        rec.label = row["label"]
    return rec


def _find_captions_file(src: ResolvedSource, folder: str) -> str:
    if src.captions_file:
        return src.captions_file if os.path.isabs(src.captions_file) else os.path.join(folder, src.captions_file)
    found = _captions_files(folder)
    if len(found) != 1:
        raise DataError(f"{src.name}.captions_file: expected one *.jsonl or *.csv in {folder!r}, found "
                        f"{[os.path.basename(f) for f in found]}; set captions_file")
    return found[0]


def _caption_rows(path: str) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Rows of a captions .jsonl / .csv as (row, problem). Bytes that are not UTF-8 survive as
    surrogate escapes (the caption check reports them as non_utf8_caption)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    if path.endswith(".csv"):
        yield from ((row, None) for row in csv.DictReader(io.StringIO(text, newline="")))
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        yield (row, None) if isinstance(row, dict) else (None, "malformed_json")


def _read_folder(src: ResolvedSource, folder: str, start: int, keep: Keep, prog: _Progress) -> Iterator[Record]:
    seen: set[str] = set()
    for index, (row, problem) in enumerate(_caption_rows(_find_captions_file(src, folder))):
        name = str(row.get(src.image_key) or "") if row else ""
        duplicate = bool(name) and name in seen
        seen.add(name)
        if index < start or not keep(index):
            continue
        if problem or duplicate:
            yield Record(key=name or f"#{index}", index=index, problem=problem or "duplicate_key")
            continue
        yield _folder_record(src, folder, row, name, index)


def _folder_record(src: ResolvedSource, folder: str, row: dict[str, Any], name: str, index: int) -> Record:
    caption, problem = _pick_caption(row.get(src.caption_key))
    rec = Record(key=name or f"#{index}", index=index, caption=caption, problem=problem)
    file = os.path.join(folder, name)
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if not name or not os.path.isfile(file):
        rec.problem, rec.detail = "missing_image", file
    elif ext not in IMAGE_EXTS:
        rec.problem, rec.detail = "unsupported_format", ext
    else:
        with open(file, "rb") as f:
            rec.image = f.read()
    return rec


__all__ = ["Record", "ResolvedSource", "expand_braces", "resolve_paths", "resolve_source", "infer_format",
           "read_shard", "split_member", "expected_samples"]
