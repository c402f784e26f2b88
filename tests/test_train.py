"""The pretraining entry point: configuration errors, a smoke run, golden losses, checkpoints,
non-finite losses, activation checkpointing, the GPU configs, and exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from limoe_ds.checkpoint import io as checkpoint
from limoe_ds.config import run as run_config
from limoe_ds.runtime.launch_env import free_port
from limoe_ds.config.run import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ds_configs" / "tiny.json"
MINI = ROOT / "data" / "mini"
GOLDEN = ROOT / "tests" / "assets" / "golden_tiny_losses.json"
# A short, fully determined run of the real entry point on the bundled data (1 rank, ep 1).
SHORT = ["parallel.expert_parallel_size=1", "train.log_every=1", "logging.progress_bar=false",
         "ds.scheduler.params.warmup_num_steps=2", "eval.max_batches=0", "data.num_workers=0"]


@pytest.fixture(scope="module", autouse=True)
def bundled_data():
    # Missing data is a failure, not a skip: CI builds it first (tools/build_mini_dataset.py).
    assert (MINI / "tokenizer.json").is_file(), f"{MINI} is missing: run python tools/build_mini_dataset.py"


def _write(tmp_path, raw: dict) -> str:
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(raw))
    return str(p)


def _tiny_raw() -> dict:
    raw = json.loads(TINY.read_text())
    lim = raw["limoe"]
    lim["tokenizer"] = str(MINI / "tokenizer.json")
    lim["data"]["train"], lim["data"]["val"] = str(MINI / "train"), str(MINI / "val")
    return raw


def _main(argv):
    from limoe_ds.train.cli import main
    return main(argv)


# ---- configuration errors: one line, naming the key, exit status 2, before any process group ----
BAD = [
    ("unknown key", lambda r: r["limoe"]["train"].update(stepz=3), [], "train.stepz: unknown key"),
    ("unknown section", lambda r: r["limoe"].update(optim={}), [], "limoe.optim: unknown section"),
    ("wrong type", lambda r: r["limoe"]["train"].update(steps="many"), [], "train.steps: must be an int"),
    ("batch arithmetic", lambda r: r.update(train_batch_size=100), [],
     "train_batch_size: 100 != train_micro_batch_size_per_gpu (64)"),
    ("gradient accumulation", lambda r: r.update(gradient_accumulation_steps=0), [],
     "gradient_accumulation_steps: must be an int >= 1 (k > 1: gradient caching"),
    ("experts vs ep", lambda r: None, ["parallel.expert_parallel_size=3"], "does not divide"),
    ("world vs layout", lambda r: None, ["WORLD=3"],
     "parallel.expert_parallel_size: ep=2 does not divide the data-parallel size 3"),
    ("world vs tp", lambda r: None, ["WORLD=3", "parallel.tensor_parallel_size=2"],
     "parallel.tensor_parallel_size: world size 3 is not divisible by tp=2"),
    ("tp vs heads", lambda r: None,
     ["WORLD=8", "parallel.tensor_parallel_size=8", "parallel.expert_parallel_size=1", "ds.train_batch_size=64"],
     "tp=8 does not divide model.num_heads=4"),
    ("tp x ep vs world", lambda r: None, ["parallel.tensor_parallel_size=2"],
     "ep=2 does not divide the data-parallel size 1 (world 2 / tp 2)"),
    ("image vs patch", lambda r: r["limoe"]["model"].update(image_size=30), [],
     "model.image_size: 30 is not divisible by patch_size 8"),
    ("missing data", lambda r: None, ["data.train=/nonexistent/shards"],
     "data.train[0]: '/nonexistent/shards' matches no file"),
    ("missing tokenizer", lambda r: None, ["tokenizer=/nope.json"], "tokenizer: '/nope.json' does not exist"),
    ("zero 3", lambda r: r["zero_optimization"].update(stage=3), [], "zero_optimization.stage: 3 is not supported"),
    ("zero 0 clipping with ep", lambda r: r["zero_optimization"].update(stage=0), [], "clips by a wrong gradient norm"),
    ("schedule length", lambda r: r["scheduler"]["params"].update(total_num_steps=7), [],
     "scheduler.params.total_num_steps: 7 != train.steps"),
    ("bad moe key", lambda r: r["limoe"]["model"].update(moe={"capacity": 2}), [], "moe.capacity: unknown key"),
    ("unknown preset", lambda r: r["limoe"]["model"].update(preset="b99"), [], "unknown preset 'b99'"),
    ("world size pinned", lambda r: r["limoe"]["parallel"].update(world_size=8), [],
     "parallel.world_size: this config is written for 8 ranks"),
    ("bad override", lambda r: None, ["trainsteps"], "--set: expected KEY=VALUE"),
    ("no limoe block", lambda r: r.pop("limoe"), [], "limoe: the DeepSpeed config needs"),
]


@pytest.mark.parametrize("name,mutate,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_with_one_line(tmp_path, monkeypatch, capsys, name, mutate, extra, message):
    raw = _tiny_raw()
    mutate(raw)
    world = next((e.split("=")[1] for e in extra if e.startswith("WORLD=")), "2")
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    sets = [e for e in extra if not e.startswith("WORLD=")]
    rc = _main(["--deepspeed_config", _write(tmp_path, raw), "--set", *sets] if sets else
               ["--deepspeed_config", _write(tmp_path, raw)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("name,world", [("s32", 8), ("b16", 32), ("l16", 64), ("h14", 256)])
def test_gpu_configs_validate_for_their_cluster(name, world):
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}.json", world_size=world, check_paths=False)
    ds = cfg.deepspeed
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] in (1, 2)
    assert ds["train_batch_size"] == cfg.micro_batch_size * world
    assert cfg.model.moe.num_experts % cfg.parallel.expert_parallel_size == 0
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.steps
    with pytest.raises(ConfigError, match="parallel.world_size"):
        run_config.load(ROOT / "ds_configs" / f"{name}.json", world_size=world // 2, check_paths=False)


# ---- the real entry point, one rank, in this process ---------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    from limoe_ds.train.trainer import train
    raw = run_config.apply_overrides(_tiny_raw(), SHORT + ["train.steps=8", f"train.run_dir={run_dir}",
                                                           "train.save_every=4"])
    cfg = run_config.resolve(raw, world_size=1)
    from limoe_ds.train.engine import init_distributed
    init_distributed()
    torch.manual_seed(0)
    return run_dir, train(cfg, rank=0, world=1, resume="none")


@pytest.mark.integration  # smoke_run: a 1-rank process group and the engine
def test_smoke_run_trains_logs_and_checkpoints(smoke_run):
    run_dir, summary = smoke_run
    assert summary["steps"] == 8 and len(summary["losses"]) == 8
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    ev = summary["eval"]
    assert ev["dropless/val/pairs"] == 628 and ev["dropless/val/contrastive"] > 0
    for mode in ("dropless", "train_cf"):
        assert 0 <= ev[f"{mode}/retrieval/i2t/R@1"] <= ev[f"{mode}/retrieval/i2t/R@5"] <= 1
        zs = f"{mode}/zeroshot/fashion_mnist"
        assert ev[f"{zs}/images"] == 10000 and 0 <= ev[f"{zs}/top1"] <= ev[f"{zs}/top5"] <= 1
        assert ev[f"{zs}/chance_top1"] == 0.1
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        "step00000004", "step00000008"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for key in ("loss/contrastive", "aux/moe/layer1/text/global_entropy", "routing/layer3/image/success_rate",
                "train/lr", "train/grad_norm", "train/temperature", "train/samples_per_s", "train/tokens_per_s"):
        assert key in train_rows[-1], key
    assert any(f.name.startswith("events.out.tfevents") for f in (run_dir / "tensorboard").iterdir())
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    assert resolved["limoe"]["train"]["steps"] == 8 and resolved["train_batch_size"] == 64
    marker = json.loads((run_dir / "checkpoints" / "step00000008" / checkpoint.MARKER).read_text())
    assert marker["step"] == 8 and marker["config"]["limoe"]["train"]["steps"] == 8
    assert summary["train_samples_per_s"] > 0
    success = summary["routing_success_last_window"]
    assert set(success) == {"layer1/image", "layer1/text", "layer3/image", "layer3/text"}
    assert all(0 < v <= 1 for v in success.values())


@pytest.mark.integration  # smoke_run
def test_golden_loss_curve(smoke_run):
    """A silent change in numerics fails here. Regenerate deliberately with LIMOE_UPDATE_GOLDEN=1."""
    losses = smoke_run[1]["losses"]
    if os.environ.get("LIMOE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "ds_configs/tiny.json", "overrides": SHORT + ["train.steps=8"],
                                      "contrastive_losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["contrastive_losses"]
    assert losses == pytest.approx(golden, rel=1e-4, abs=1e-5)


@pytest.mark.integration  # smoke_run's checkpoints
def test_interrupted_save_keeps_the_previous_checkpoint(smoke_run, tmp_path, monkeypatch):
    run_dir, _ = smoke_run
    import shutil
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", ckpts)

    class Crashing:
        module = torch.nn.Linear(2, 2)

        def save_checkpoint(self, root, tag, **kw):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half-writ")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(Crashing(), ckpts, 12, rank_state=dict, meta={}, keep_last=3)
    assert (ckpts / "step00000012.partial").is_dir()
    assert checkpoint.find_latest(ckpts).name == "step00000008"
    assert (ckpts / "latest").read_text() == "step00000008"


def test_refuses_to_save_non_finite_weights(tmp_path):
    class Diverged:
        module = torch.nn.Linear(2, 2)

    with torch.no_grad():
        Diverged.module.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        checkpoint.save(Diverged(), tmp_path, 3, rank_state=dict, meta={}, keep_last=1)
    assert not any(tmp_path.iterdir())


def test_resume_from_incomplete_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "step00000003").mkdir()
    with pytest.raises(ValueError, match="not a complete limoe_ds checkpoint"):
        checkpoint.load(None, tmp_path / "step00000003")


@pytest.mark.integration  # train() on smoke_run's process group
def test_non_finite_losses_skip_steps_then_stop(smoke_run, tmp_path, monkeypatch):
    from limoe_ds.train import engine as eng
    from limoe_ds.train.trainer import train
    calls = []

    def nan_step(engine, batch, **kw):
        calls.append(1)
        return eng.StepResult(True, float("nan"), float("nan"), {}, {})
    monkeypatch.setattr(eng, "train_step", nan_step)
    raw = run_config.apply_overrides(_tiny_raw(), SHORT + ["train.steps=5", f"train.run_dir={tmp_path}",
                                                           "train.max_consecutive_nonfinite=3"])
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        train(run_config.resolve(raw, world_size=1), rank=0, world=1, resume="none")
    assert len(calls) == 3
    assert checkpoint.find_latest(tmp_path / "checkpoints") is None


@pytest.mark.integration  # the engine, on smoke_run's process group
def test_a_non_finite_batch_is_skipped_without_touching_the_weights(smoke_run):
    from limoe_ds.train.engine import build_engine, train_step
    from limoe_ds.model import build_model
    raw = _tiny_raw()
    model = build_model("tiny")
    ds = run_config.resolve(run_config.apply_overrides(raw, SHORT + ["train.steps=2"]), world_size=1).deepspeed
    engine, _ = build_engine(model, ds)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.full((64, 3, 32, 32), float("nan"))
    r = train_step(engine, {"images": images, "tokens": torch.ones(64, 16, dtype=torch.long)})
    assert r.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_activation_checkpointing_recomputes_the_same_routing():
    from limoe_ds.losses import contrastive_loss
    from limoe_ds.model import build_model
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    tokens = torch.randint(1, 4096, (8, 16), generator=gen)
    results = []
    for ckpt in (False, True):
        model = build_model("tiny", seed=1)
        model.activation_checkpointing = ckpt
        torch.manual_seed(5)  # router noise on: the recomputation must replay it
        out = model(images, tokens)
        loss = contrastive_loss(out.image_emb, out.text_emb, out.logit_scale) + sum(out.aux_losses.values())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=0, atol=0, msg=n)


# ---- two ranks through the deepspeed launcher: kill -9 mid-run, resume, same losses ---------------
LAUNCHED: list[subprocess.Popen] = []  # killed after each test if still running (tests/conftest.py)


def _launch(run_dir: Path, steps: int, extra=(), ranks: int = 2, wrapper=()) -> subprocess.Popen:
    """The deepspeed runner on ``ranks`` CPU ranks (behind ``wrapper``, a command prefix, if given).
    Zero-shot on the first 500 images of the set (eval.zero_shot_max_images): the whole set's 10,000
    cost about 10 s per launch; the smoke run (smoke_run) evaluates all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [*wrapper, sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()),
           str(ROOT / "launch" / "pretrain.py"), "--deepspeed_config", str(TINY), "--set", f"train.steps={steps}",
           f"train.run_dir={run_dir}", "train.log_every=1", "train.save_every=4", "logging.progress_bar=false",
           "ds.scheduler.params.warmup_num_steps=2", "eval.max_batches=1",
           "eval.zero_shot_max_images=500", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    LAUNCHED.append(proc)
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss/total" in row:
            out[row["step"]] = row["loss/total"]  # after a resume the re-run steps overwrite
    return out


def _shm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_resume_after_kill_9_continues_bitwise(tmp_path):
    steps = 12
    shm_before = _shm_buffers()
    full = _launch(tmp_path / "full", steps)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    killed = _launch(tmp_path / "killed", steps)
    marker = tmp_path / "killed" / "checkpoints" / "step00000008" / checkpoint.MARKER
    deadline = time.time() + 600
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run ended or stalled before its step-8 checkpoint"
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    killed.wait()
    resumed = _launch(tmp_path / "killed", steps)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step00000008" in out
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same data, RNG, optimizer state
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM per rank) are unlinked at init: neither the
    # finished runs nor the SIGKILLed one leave any in /dev/shm (engine._unlink_shm_buffer).
    assert _shm_buffers() - shm_before == set()
    # The resumed run's expert-parallel-2 checkpoint, consolidated and evaluated on one rank with every
    # expert (tools/evaluate.py), gives the 2-rank engine's dropless zero-shot numbers.
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as evaluate_tool
    final = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "dropless/zeroshot/fashion_mnist/top1" in line][-1]
    report_path = tmp_path / "report.json"
    ckpt = tmp_path / "killed" / "checkpoints" / f"step{steps:08d}"
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["step"] == steps and "tools/evaluate.py" in report["command"]
    zs_keys = [k for k in report["metrics"] if k.startswith("dropless/zeroshot/")]
    assert len(zs_keys) >= 6
    for k in zs_keys:
        assert report["metrics"][k] == pytest.approx(final[k], abs=1e-9), k




TP2 = ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=1", "ds.train_batch_size=64",
       "eval.zero_shot=[]"]


@pytest.mark.integration  # the deepspeed launcher (_launch)
def test_tensor_parallel_2_run_resumes_bitwise_and_evaluates_on_one_rank(tmp_path):
    """The real entry point at TP=2: both tp ranks' shards are checkpointed (DeepSpeed would keep
    only tp rank 0's), a resume continues bitwise, and the consolidated checkpoint evaluated on one
    rank (tp=1, tools/evaluate.py) reproduces the run's final dropless evaluation."""
    steps = 8
    full = _launch(tmp_path / "full", steps, TP2)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    ckpt4 = tmp_path / "full" / "checkpoints" / "step00000004"
    assert {f"mp_rank_0{t}_model_states.pt" for t in (0, 1)} <= {p.name for p in ckpt4.iterdir()}
    resumed = _launch(tmp_path / "resumed", steps, [*TP2, "--resume", str(ckpt4)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == list(range(5, steps + 1)) and [a[s] for s in b] == [b[s] for s in b]

    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as evaluate_tool
    final = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
             if "dropless/val/contrastive" in line][-1]
    assert final["dropless/val/pairs"] == 256  # one batch on the one data-parallel rank, not one per tp rank
    report_path = tmp_path / "report.json"
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "full" / "checkpoints" / f"step{steps:08d}"),
                               "--out", str(report_path)]) == 0
    got = json.loads(report_path.read_text())["metrics"]
    assert got["dropless/val/pairs"] == 256
    # tp=2 sums the row-parallel matmuls in another order: ulps apart, same rankings
    assert got["dropless/val/contrastive"] == pytest.approx(final["dropless/val/contrastive"], rel=1e-5)
    for k in [k for k in got if k.startswith("dropless/retrieval/")]:
        assert got[k] == pytest.approx(final[k], abs=1e-9), k
    # export reads the fp32 master weights from the ZeRO shards of both tp ranks: in this fp32 run
    # they are the module weights consolidated above, bit for bit
    import convert_checkpoint as convert_tool
    from limoe_ds import load_pretrained
    ckpt8 = tmp_path / "full" / "checkpoints" / f"step{steps:08d}"
    assert convert_tool.main(["export", str(ckpt8), str(tmp_path / "export")]) == 0
    exported = load_pretrained(tmp_path / "export").model.state_dict()
    for name, value in checkpoint.consolidated_model_state(ckpt8).items():
        assert torch.equal(exported[name], value), name

    # reshard tp=2 (2 ranks, dp 1) -> tp=1 on 1 rank (dp 1: the data position carries over); the
    # resumed run continues the curve up to the row-parallel summation order (1e-5 relative)
    assert convert_tool.main(["reshard", str(ckpt4), str(tmp_path / "tp1"),
                              "--tp", "1", "--ep", "1", "--world", "1"]) == 0
    one = _launch(tmp_path / "one_rank", steps, [*TP2, "parallel.tensor_parallel_size=1", "ds.train_batch_size=64",
                                                 "--resume", str(tmp_path / "tp1" / "step00000004")], ranks=1)
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out[-3000:]
    c = _losses(tmp_path / "one_rank")
    assert sorted(c) == list(range(5, steps + 1))
    for s in c:
        assert c[s] == pytest.approx(a[s], rel=1e-5), s


def test_weight_decay_only_on_matrices_and_experts_in_moe_groups():
    from limoe_ds.train.engine import param_groups, weight_decay_split
    from limoe_ds.model import build_model
    model = build_model("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = weight_decay_split(model)
    no_decay_names = {names[id(p)] for p in no_decay}
    assert {"logit_scale", "token_embed.weight", "image_pos", "text_pos", "final_ln.weight",
            "blocks.0.ln1.bias", "image_head.bias"} <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.dim() >= 2 for p in decay)
    assert "blocks.1.ffn.deepspeed_moe.gate.wg.weight" in {names[id(p)] for p in decay}
    groups = param_groups(model)
    moe_groups = [g for g in groups if g.get("moe")]
    assert moe_groups and all("deepspeed_experts" in names[id(p)] for g in moe_groups for p in g["params"])
    assert {g["weight_decay"] for g in groups if g["name"].startswith("no_decay")} == {0.0}


def test_evaluate_tool_rejects_a_partial_checkpoint(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as evaluate_tool
    (tmp_path / "step00000004.partial").mkdir()
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "step00000004.partial")]) == 2
    assert "not a complete limoe_ds checkpoint" in capsys.readouterr().err
