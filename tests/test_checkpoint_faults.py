"""Damaged checkpoints and a full disk: found before use, named in one line, never silently used.

Each damage is injected into a copy of ``reference_run`` (tests/conftest.py: 2 ranks, ep 2,
checkpoints at steps 2 and 4) and checked in this process (checkpoint.io, the tools); one launched
run resumes a damaged copy (falls back to step 2, recomputes steps 3-4 bitwise) on a small tmpfs,
where its step-4 save runs out of space.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from limoe_ds.checkpoint import format as fmt
from limoe_ds.checkpoint import integrity
from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.checkpoint.format import CheckpointError
from test_train import ROOT, _launch, _losses

sys.path.insert(0, str(ROOT / "tools"))
import convert_checkpoint as convert_tool  # noqa: E402
import evaluate as evaluate_tool  # noqa: E402

LEGACY = ROOT / "tests" / "assets" / "legacy"


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip16(f: Path) -> None:
    """16 bytes in the middle of the file inverted: the size is unchanged."""
    b = bytearray(f.read_bytes())
    m = len(b) // 2
    b[m:m + 16] = bytes(x ^ 0xFF for x in b[m:m + 16])
    f.write_bytes(bytes(b))


# (id, file, damage, does tools/evaluate.py read the file)
DAMAGES = [
    ("truncated-zero-shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt", _truncate, False),
    ("truncated-model-states", "mp_rank_00_model_states.pt", _truncate, True),
    ("truncated-expert", "layer_1_expert_2_mp_rank_00_model_states.pt", _truncate, True),
    ("truncated-rank-state", "limoe_rank00001.pt", _truncate, False),
    ("truncated-marker", fmt.MARKER, _truncate, True),
    ("flipped-zero-shard", "zero_pp_rank_0_mp_rank_00_optim_states.pt", _flip16, False),
    ("flipped-expert", "layer_0_expert_1_mp_rank_00_model_states.pt", _flip16, True),
]


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.integration  # reference_run: the deepspeed launcher (session-scoped, shared)
@pytest.mark.parametrize("name,damage,evaluated", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_damage_is_found_named_and_auto_falls_back(reference_run, tmp_path, capsys, name, damage, evaluated):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", root)
    bad, good = root / "step00000004", root / "step00000002"
    assert "files" in json.loads((bad / fmt.MARKER).read_text())  # checksums recorded at save
    assert integrity.verify(bad).ok
    damage(bad / name)
    named = str(bad / name)

    verdict = checkpoint.verify_collectively(bad)
    assert len(verdict.problems) == 1 and verdict.problems[0].startswith(named), verdict.problems
    # --resume auto: the newest checkpoint that verifies, with a warning naming the damaged file
    path, notes = checkpoint.choose_resume(root, "auto")
    assert path == good
    assert len(notes) == 1 and named in notes[0] and "steps 3-4 will be recomputed" in notes[0], notes
    # --resume DIR: one line naming the file and the fallback command
    with pytest.raises(CheckpointError) as e:
        checkpoint.choose_resume(root, str(bad))
    assert named in str(e.value) and f"--resume {good}" in str(e.value) and "\n" not in str(e.value)

    assert convert_tool.main(["inspect", str(bad)]) == 2
    assert named in _one_line(capsys)
    assert convert_tool.main(["export", str(bad), str(tmp_path / "export")]) == 2
    assert named in _one_line(capsys) and not (tmp_path / "export").exists()
    if evaluated:  # evaluate reads the marker, the model states and the experts (not the optimizer)
        assert evaluate_tool.main(["--checkpoint", str(bad)]) == 2
        assert named in _one_line(capsys)
    assert bad.is_dir() and (bad / name).is_file()  # never deleted


@pytest.mark.integration  # reference_run
def test_damaged_export_is_refused_by_load_pretrained(reference_run, tmp_path, capsys):
    from limoe_ds import load_pretrained
    out = tmp_path / "export"
    assert convert_tool.main(["export", str(reference_run / "checkpoints" / "step00000004"), str(out)]) == 0
    capsys.readouterr()
    assert "model.safetensors" in json.loads((out / "limoe_export.json").read_text())["files"]
    load_pretrained(out)
    _flip16(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_pretrained(out)
    _truncate(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: .* bytes, .* recorded at save"):
        load_pretrained(out)


def test_legacy_checkpoint_without_checksums_is_checked_and_noted_once(tmp_path, capsys):
    ckpt = tmp_path / "step00000002"
    shutil.copytree(LEGACY / "ep2" / "step00000002", ckpt)
    assert "files" not in json.loads((ckpt / fmt.MARKER).read_text())
    for _ in range(2):
        verdict = integrity.require(ckpt, "--checkpoint")
        assert verdict.ok and verdict.legacy
    assert capsys.readouterr().err.count("no checksums (written by an older limoe_ds)") == 1
    path, notes = checkpoint.choose_resume(tmp_path, "auto")
    assert path == ckpt and any("no checksums" in n for n in notes)
    # without checksums, the zip CRCs torch writes still catch flipped bytes and truncation
    _flip16(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _truncate(ckpt / "limoe_rank00001.pt")
    problems = integrity.verify(ckpt).problems
    assert [Path(p.split(":")[0]).name for p in problems] == ["limoe_rank00001.pt",
                                                               "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


class _FakeEngine:
    """Writes one module file through its checkpoint engine, as DeepSpeed does (not DeepSpeed's
    TorchCheckpointEngine: the recording engine hashes the file after its save)."""

    class Writer:
        def save(self, state_dict, path):
            torch.save(state_dict, path)

    def __init__(self, numel: int = 1000) -> None:
        self.module = torch.nn.Linear(2, 2)
        self.numel, self.checkpoint_engine = numel, self.Writer()

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": torch.randn(self.numel), **client_state},
                                    str(Path(root) / tag / "mp_rank_00_model_states.pt"))


def _save(root: Path, step: int, keep_last: int, numel: int = 1000) -> Path:
    return checkpoint.save(_FakeEngine(numel), root, step, rank_state=lambda: {"step": step},
                           meta={"config": {}}, keep_last=keep_last)


def test_pruning_never_deletes_the_only_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_DAMAGED", set())
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(root, step, keep_last=2)
    _flip16(root / "step00000004" / "mp_rank_00_model_states.pt")
    path, notes = checkpoint.choose_resume(root, "auto")
    assert path == root / "step00000002" and "mp_rank_00_model_states.pt" in notes[0]
    # keep_last=1 after the fallback: the damaged step 4 neither counts as kept nor is deleted
    _save(root, 3, keep_last=1)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000003", "step00000004"]
    _save(root, 4, keep_last=1)  # step 4 again: the damaged one is set aside, not deleted
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000004"]
    assert integrity.verify(root / "step00000004").ok
    aside = root / f"step00000004{fmt.DAMAGED_SUFFIX}"
    assert not integrity.verify(aside).ok  # the damaged copy, kept for the user
    assert (root / "latest").read_text() == "step00000004"


@contextmanager
def _tmpfs(path: Path, size: str):
    """A real, small file system (we run as root): mount(2) directly, no process started."""
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t tmpfs {path} ({os.strerror(err)}): the disk-full tests need root")
    try:
        yield path
    finally:
        assert libc.umount2(str(path).encode(), 2) == 0, os.strerror(ctypes.get_errno())  # MNT_DETACH


def test_disk_full_is_one_line_naming_the_file_and_keeps_the_previous(tmp_path):
    root = tmp_path / "checkpoints"
    with _tmpfs(root, "2m"):
        first = _save(root, 2, keep_last=3, numel=300_000)  # 1.2 MB: fits
        with pytest.raises(CheckpointError) as e:
            _save(root, 4, keep_last=3, numel=300_000)  # another 1.2 MB does not
        msg = str(e.value)
        assert "\n" not in msg and "no space left on device" in msg
        assert msg.startswith(str(root / "step00000004.partial" / "mp_rank_00_model_states.pt") + ":"), msg
        assert f"needs about 1.2 MB (the size of {first.name})" in msg and "train.keep_last" in msg
        assert checkpoint.complete_checkpoints(root) == [first] and integrity.verify(first).ok
        assert (root / "latest").read_text() == first.name
        assert (root / "step00000004.partial").is_dir()  # left incomplete, never taken for complete


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_launched_resume_falls_back_recomputes_bitwise_then_disk_full_is_one_line(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    with _tmpfs(root, "80m"):  # the two reference checkpoints (68 MB) fit, a third does not
        for p in (reference_run / "checkpoints").iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy)(p, root / p.name)
        damaged = root / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        _flip16(damaged)
        proc = _launch(run_dir, 4, ["train.save_every=2"])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 2, out[-3000:]
        assert f"{damaged}: checksum mismatch" in out and "falling back to" in out and "resumed from" in out
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "no space left on device" in errors[0], errors
        assert f"{root / 'step00000004.partial'}/" in errors[0] and "step00000002" in errors[0]
        ref = _losses(reference_run)
        got = _losses(run_dir)
        assert sorted(got) == [3, 4] and [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]  # bitwise
        assert checkpoint.choose_resume(root, "auto")[0] == root / "step00000002"  # still resumable
        assert damaged.is_file()  # kept
