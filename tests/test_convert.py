"""Checkpoint conversion and inference without DeepSpeed (tools/convert_checkpoint.py, load_pretrained).

An expert-parallel-2, ZeRO-2 run of the real entry point is exported; the exported model's
embeddings equal the DeepSpeed engine's eval-mode (dropless) embeddings of the same checkpoint on
the same inputs, and the converter's fp32 weights and Adam moments equal DeepSpeed's own view of
each parameter (safe_get_full_fp32_param / safe_get_full_optimizer_state) on every rank.
Tolerance: identical fp32 weights; the engine's experts see their tokens in other groupings (the
all-to-all), which moves matmul results by ulps: embeddings agree to 1e-5 (measured ~1e-7).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_ranks
from test_train import ROOT, _launch, _losses

sys.path.insert(0, str(ROOT / "tools"))
import convert_checkpoint as convert_tool  # noqa: E402

pytestmark = pytest.mark.integration  # every test launches runs (_launch) or uses their checkpoints

EP2_ZERO2 = ["ds.zero_optimization.stage=2", "eval.zero_shot=[]", "eval.max_batches=0"]


@pytest.fixture(scope="module")
def ep2_full_run(tmp_path_factory) -> Path:
    """8 steps, checkpoints at 4 and 8: the uninterrupted curve for the resharding test."""
    run = tmp_path_factory.mktemp("ep2_zero2")
    proc = _launch(run, 8, EP2_ZERO2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return run


@pytest.fixture(scope="module")
def ep2_run(ep2_full_run) -> Path:
    return ep2_full_run / "checkpoints" / "step00000004"


def _inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    tokens = torch.randint(1, cfg.vocab_size, (6, cfg.text_len), generator=gen)
    return images, tokens.masked_fill(torch.arange(cfg.text_len) >= torch.tensor([[3], [16], [1], [9], [5], [12]]), 0)


def _engine_worker(rank, world, ckpt_dir: str):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from limoe_ds import parallel
    from limoe_ds.checkpoint import io as checkpoint
    from limoe_ds.config import run as run_config
    from limoe_ds.train.engine import build_engine
    from limoe_ds.model import build_model
    marker = checkpoint.read_marker(Path(ckpt_dir), "test")
    cfg = run_config.resolve(marker["config"], world_size=world, check_paths=False)
    layout = parallel.Layout(rank=rank, world_size=world, ep=cfg.parallel.expert_parallel_size,
                             tp=cfg.parallel.tensor_parallel_size)
    parallel.setup(layout)
    model = parallel.parallelize(build_model(cfg.model, ep_size=layout.ep, ep_rank=layout.ep_rank,
                                             seed=123), layout)  # weights overwritten by the load
    engine, _ = build_engine(model, cfg.deepspeed)
    checkpoint.load(engine, Path(ckpt_dir))
    engine.optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed links Adam's state at the first step
    num_local = cfg.model.moe.num_experts // layout.ep
    full = {}
    for name, p in engine.module.named_parameters():
        gname = name.replace("deepspeed_experts.", "deepspeed_experts.#")
        if "#" in gname:
            head, tail = gname.split("#")
            local, rest = tail.split(".", 1)
            gname = f"{head}{layout.ep_rank * num_local + int(local)}.{rest}"
        full[gname] = {"fp32": safe_get_full_fp32_param(p).clone(),
                       "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                       "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
    engine.module.eval()
    images, tokens = _inputs(cfg.model)
    with torch.no_grad():
        out = engine.module(images, tokens, None)  # dropless
    parallel.teardown()
    return {"image": out.image_emb, "text": out.text_emb, "params": full}


def test_export_load_pretrained_equals_engine_and_converter_equals_deepspeed(ep2_run, tmp_path):
    from limoe_ds import load_pretrained
    from limoe_ds.checkpoint.convert import read_full_state
    out = tmp_path / "export"
    assert convert_tool.main(["export", str(ep2_run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "limoe_export.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert json.loads((out / "limoe_export.json").read_text())["source_layout"] == {"tp": 1, "ep": 2, "world_size": 2}
    engine = run_ranks(_engine_worker, 2, str(ep2_run))
    m = load_pretrained(out)
    images, tokens = _inputs(m.cfg)
    img, txt = m.encode_image(images), m.encode_text(tokens)
    for res in engine:  # both ranks embed the same batch; experts are split across them
        torch.testing.assert_close(img, res["image"], rtol=0, atol=1e-5)
        torch.testing.assert_close(txt, res["text"], rtol=0, atol=1e-5)
    state = read_full_state(ep2_run)
    seen = set()
    for res in engine:
        for name, want in res["params"].items():
            seen.add(name)
            assert torch.equal(state.weights[name], want["fp32"]), name
            assert torch.equal(state.exp_avg[name], want["exp_avg"]), name
            assert torch.equal(state.exp_avg_sq[name], want["exp_avg_sq"]), name
    assert seen == set(state.weights) and state.adam_step and set(state.adam_step.values()) == {4}
    assert any("deepspeed_experts.3." in n for n in seen)  # rank 1's experts, by global index


def test_pretrained_helpers(ep2_run, tmp_path):
    from limoe_ds import load_pretrained
    out = tmp_path / "export"
    assert convert_tool.main(["export", str(ep2_run), str(out)]) == 0
    m = load_pretrained(out)
    toks = m.tokenize(["a photo of a bag", ""])
    assert toks.shape == (2, m.cfg.text_len) and toks[1, 0] == 1 and toks[1, 1:].eq(0).all()  # EOS, then padding
    clf = m.zero_shot_classifier(["shirt", "bag", "sandal"], ["a photo of a {}.", "a {}."])
    assert clf.shape == (3, m.cfg.embed_dim) and torch.allclose(clf.norm(dim=-1), torch.ones(3))
    from PIL import Image
    pix = m.preprocess([Image.new("RGBA", (50, 40), (255, 0, 0, 0)), Image.new("L", (20, 30), 7)])
    assert pix.shape == (2, 3, m.cfg.image_size, m.cfg.image_size) and pix[0].eq(1.0).all()  # transparent -> white
    # dropless: an image's embedding does not depend on the rest of its batch
    alone = m.encode_image(pix[:1])
    torch.testing.assert_close(m.encode_image(pix)[:1], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="templates with"):
        m.zero_shot_classifier(["shirt"], ["no placeholder"])
    with pytest.raises(FileNotFoundError, match="not an exported limoe_ds model"):
        load_pretrained(tmp_path)


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def test_bad_checkpoints_are_clear_errors(ep2_run, tmp_path, capsys):
    def run(*args) -> str:
        assert convert_tool.main(list(map(str, args))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    missing = _copy(ep2_run, tmp_path / "missing")
    (missing / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in run("inspect", missing)

    truncated = _copy(ep2_run, tmp_path / "truncated")
    f = truncated / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "truncated or damaged" in run("inspect", truncated)

    mismatch = _copy(ep2_run, tmp_path / "mismatch")
    marker = json.loads((mismatch / "limoe_complete.json").read_text())
    marker["config"]["limoe"]["model"]["mlp_dim"] = 256
    (mismatch / "limoe_complete.json").write_text(json.dumps(marker))
    assert "do not match the checkpoint's model config" in run("inspect", mismatch)

    partial = tmp_path / "step00000009.partial"
    partial.mkdir()
    assert "not a complete limoe_ds checkpoint" in run("export", partial, tmp_path / "x")

    existing = tmp_path / "existing"
    existing.mkdir()
    assert "exists" in run("export", ep2_run, existing)
    assert not list(tmp_path.glob("*.tmp*"))  # never a partial output



def _same_state(a, b) -> bool:
    return a.weights.keys() == b.weights.keys() and a.step == b.step and all(
        torch.equal(a.weights[k], b.weights[k]) and torch.equal(a.exp_avg[k], b.exp_avg[k])
        and torch.equal(a.exp_avg_sq[k], b.exp_avg_sq[k]) and a.adam_step[k] == b.adam_step[k] for k in a.weights)


def test_reshard_ep2_to_1_to_2_and_to_tp2_keeps_adam_state_and_the_loss_curve(ep2_full_run, ep2_run, tmp_path):
    """EP 2 -> 1 -> 2 at 2 ranks (data-parallel size unchanged, so data positions and RNG carry
    over): the fp32 weights and both Adam moments survive bit for bit, and resuming at ep=1
    continues the uninterrupted run's loss curve (measured: identical; asserted to 1e-6 relative:
    its experts compute the same per-token math without the all-to-all). The round trip back to
    ep=2 is the source state bit for bit, so its resume is the plain resume tested elsewhere
    (test_train); resuming a resharded checkpoint at a new expert layout is tested here at ep=1
    and at tp=2 x ep=2."""
    from limoe_ds.checkpoint.convert import read_full_state
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    assert convert_tool.main(["reshard", str(ep2_run), str(ep1), "--ep", "1", "--world", "2"]) == 0
    assert convert_tool.main(["reshard", str(ep1 / "step00000004"), str(ep2), "--ep", "2", "--world", "2"]) == 0
    source = read_full_state(ep2_run)
    for out, ep in ((ep1, 1), (ep2, 2)):
        state = read_full_state(out / "step00000004")
        assert state.layout.ep == ep and _same_state(source, state), out
    want = _losses(ep2_full_run)
    run = tmp_path / "resumed_ep1"
    proc = _launch(run, 8, [*EP2_ZERO2, "parallel.expert_parallel_size=1", "--resume", str(ep1 / "step00000004")])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    got = _losses(run)
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in got)

    # ... and to tp=2 x ep=2 on 4 ranks (dp stays 2: exact data resume): measured identical losses;
    # asserted to 1e-5 (the row-parallel all-reduce may sum in another order)
    tp2 = tmp_path / "tp2ep2"
    assert convert_tool.main(["reshard", str(ep2_run), str(tp2), "--tp", "2", "--ep", "2", "--world", "4"]) == 0
    assert _same_state(source, read_full_state(tp2 / "step00000004"))
    run = tmp_path / "resumed_tp2ep2"
    proc = _launch(run, 8, [*EP2_ZERO2, "parallel.tensor_parallel_size=2", "parallel.world_size=4",
                            "--resume", str(tp2 / "step00000004")], ranks=4)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    got = _losses(run)
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in got)


def test_a_resharding_rank_reads_only_the_dense_parameters_and_its_own_experts(ep2_run):
    """Reshard's memory: rank e of the target expert-parallel layout keeps the dense parameters and
    experts e*n .. e*n+n-1 (experts_of), with the same values as the whole state."""
    from limoe_ds.checkpoint.convert import read_full_state
    from limoe_ds.moe.names import EXPERT_PREFIX
    from limoe_ds.checkpoint.reshard import experts_of
    from limoe_ds.config.run import model_config
    full = read_full_state(ep2_run)
    num_experts = model_config(full.config["limoe"]["model"]).moe.num_experts
    for ep, ep_rank in ((2, 1), (num_experts, 0)):
        n = num_experts // ep
        part = read_full_state(ep2_run, keep=experts_of(ep_rank, lambda name, n=n: n))
        experts = {k.split(EXPERT_PREFIX)[1].split(".")[0] for k in part.weights if EXPERT_PREFIX in k}
        assert experts == {str(e) for e in range(ep_rank * n, ep_rank * n + n)}
        dense = {k for k in full.weights if EXPERT_PREFIX not in k}
        assert dense <= set(part.weights) and len(dense) > 10
        for k in part.weights:
            assert torch.equal(part.weights[k], full.weights[k]) and torch.equal(part.exp_avg[k], full.exp_avg[k])
            assert torch.equal(part.exp_avg_sq[k], full.exp_avg_sq[k])


def test_reshard_refuses_what_it_cannot_do(ep2_run, tmp_path, capsys):
    def run(*args) -> str:
        assert convert_tool.main(["reshard", str(ep2_run), *map(str, args)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "cannot hold this model" in run(tmp_path / "a", "--ep", "3", "--world", "3")
    assert "cannot hold this model" in run(tmp_path / "b", "--ep", "1", "--tp", "8", "--world", "8")
    (tmp_path / "d").mkdir()
    assert "exists" in run(tmp_path / "d", "--ep", "1", "--world", "2")


def test_reshard_to_another_data_parallel_size_continues_at_the_next_epoch(ep2_run, tmp_path):
    """ep=2 on 2 ranks -> ep=1 on 1 rank: the data-parallel size changes, so the per-reader data
    positions cannot carry over; the step-4 position (both ranks inside epoch 0 of data/mini) becomes
    "start of epoch 1" and the 1-rank run resumes from it (global batch 64 now: micro 64 x dp 1)."""
    out = tmp_path / "dp1"
    assert convert_tool.main(["reshard", str(ep2_run), str(out), "--ep", "1", "--world", "1"]) == 0
    data = torch.load(out / "step00000004" / "limoe_rank00000.pt", weights_only=False)["data"]
    assert data["kind"] == "epoch_start" and data["next_epochs"] == [1]
    run = tmp_path / "resumed"
    proc = _launch(run, 6, [*EP2_ZERO2, "parallel.expert_parallel_size=1", "--resume", str(out / "step00000004")],
                   ranks=1)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "the data stream continues at the start of epoch 1" in log
    assert sorted(_losses(run)) == [5, 6]


@pytest.mark.parametrize("name, extra", [
    ("ep2_fp32", []),
    ("ep2_bf16", ["ds.bf16.enabled=true"]),
    ("tp2_fp32", ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=1", "ds.train_batch_size=64"]),
])
def test_zero0_run_exports_its_master_weights_and_moments(tmp_path, capsys, name, extra):
    """ZeRO 0 keeps whole optimizer states per expert-parallel rank and tp lane (no partitions):
    the export holds the fp32 master, which IS the module in an fp32 run (equal to the weights the
    evaluation consolidates) and rounds exactly to it in a bf16 run; Adam's moments are there for
    every parameter with the run's step count. Reshard refuses ZeRO 0 with a one-line error."""
    from limoe_ds import load_pretrained
    from limoe_ds.checkpoint import io as checkpoint
    from limoe_ds.checkpoint.convert import read_full_state
    proc = _launch(tmp_path / "run", 4, ["ds.zero_optimization.stage=0", "ds.gradient_clipping=0", "eval.zero_shot=[]",
                                         "eval.max_batches=0", *extra])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step00000004"
    state = read_full_state(ckpt)
    module = checkpoint.consolidated_model_state(ckpt)
    assert state.weights.keys() == module.keys()
    for k, w in state.weights.items():
        assert w.dtype == torch.float32 and w.shape == module[k].shape == state.exp_avg[k].shape, k
        assert torch.equal(w.to(module[k].dtype), module[k]), k
        assert state.exp_avg_sq[k].min() >= 0 and state.exp_avg_sq[k].abs().sum() > 0, k
    if "bf16" in name:
        assert any(not torch.equal(w, module[k].float()) for k, w in state.weights.items())  # a real master copy
    else:
        assert set(state.adam_step.values()) == {4}
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    loaded = load_pretrained(tmp_path / "export").model.state_dict()
    assert all(torch.equal(loaded[n], w) for n, w in state.weights.items())
    capsys.readouterr()
    assert convert_tool.main(["reshard", str(ckpt), str(tmp_path / "r"), "--ep", "1", "--world", "2"]) == 2
    assert "ZeRO stage 0" in capsys.readouterr().err


def test_bf16_run_exports_the_fp32_master_and_reshards_it(tmp_path):
    """A bf16 run (DeepSpeed names its shards bf16_zero_pp_rank_*): export holds the fp32 master
    weights, not the bf16 module copies (they round to the module's values exactly, and differ
    from them), and resharding keeps the master and both moments bit for bit."""
    from limoe_ds import load_pretrained
    from limoe_ds.checkpoint import io as checkpoint
    from limoe_ds.checkpoint.convert import read_full_state
    proc = _launch(tmp_path / "run", 4, [*EP2_ZERO2, "ds.bf16.enabled=true"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step00000004"
    assert (ckpt / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    master = load_pretrained(tmp_path / "export").model.state_dict()
    module = checkpoint.consolidated_model_state(ckpt)
    assert {v.dtype for v in module.values()} == {torch.bfloat16}
    assert all(torch.equal(master[k].bfloat16(), v) for k, v in module.items())
    assert any(not torch.equal(master[k], v.float()) for k, v in module.items())
    assert convert_tool.main(["reshard", str(ckpt), str(tmp_path / "ep1"), "--ep", "1", "--world", "2"]) == 0
    assert _same_state(read_full_state(ckpt), read_full_state(tmp_path / "ep1" / "step00000004"))
