"""The experiment runner (tools/experiment.py, limoe_ds.experiments): a grid of configs x seeds run
through the real entry point, resumable, failures reported, results aggregated over seeds."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from limoe_ds.config.errors import ConfigError
from limoe_ds.experiments import results, runner, spec

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "experiment.py"
SHORT = ["train.steps=8", "train.log_every=1", "train.save_every=4", "eval.every=8", "logging.progress_bar=false",
         "ds.scheduler.params.warmup_num_steps=2", "eval.max_batches=1", "eval.zero_shot=[]", "eval.compositional=[]",
         "parallel.expert_parallel_size=1", "data.num_workers=0"]
"""Short runs of one evaluation (held-out loss and retrieval on one batch): the launch dominates."""


def _grid(tmp_path: Path, configs: dict, seeds=(0, 1), **extra) -> Path:
    import yaml
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "smoke", "ds_config": str(ROOT / "ds_configs" / "tiny.json"), "ranks": 1,
                                    "seeds": list(seeds), "sets": SHORT, "configs": configs, **extra}, sort_keys=False))
    return path


# ---- the grid file --------------------------------------------------------------------------------
def test_runs_are_every_config_at_each_seed_in_turn_with_their_own_seed_and_dir(tmp_path):
    exp = spec.load(_grid(tmp_path, {"limoe": [], "dense": {"sets": ["model.preset=tiny-dense"]}}, seeds=[3, 5]),
                    out=tmp_path / "out")
    assert [(r.index, r.key) for r in exp.runs] == [(0, "limoe/seed3"), (1, "dense/seed3"), (2, "limoe/seed5"),
                                                   (3, "dense/seed5")]
    r = exp.runs[3]
    assert r.run_dir == tmp_path / "out" / "dense" / "seed5"
    assert r.overrides()[-5:] == ["model.preset=tiny-dense", "train.seed=5", "data.seed=5", "parallel.world_size=1",
                                  f"train.run_dir={r.run_dir}"]
    assert spec.validate(r, 1).model.moe is None  # resolved as the entry point would


@pytest.mark.parametrize("change, message", [
    ({"seed": [1]}, "experiment.seed: unknown key; known: name, description"),
    ({"name": "my grid"}, "experiment.name: must be a plain name"),
    ({"seeds": [1, 1]}, "experiment.seeds: has duplicates: [1, 1]"),
    ({"seeds": ["1"]}, "experiment.seeds: must be a non-empty list of integers"),
    ({"sets": ["train.seed=3"]}, "experiment.sets: train.seed is set by the runner for each run"),
    ({"configs": {"a": {"set": []}}}, "experiment.configs.a.set: unknown key; known: ds_config, sets"),
    ({"configs": {"a": ["model.width"]}}, "experiment.configs.a: must be a list of KEY=VALUE strings"),
    ({"ranks": 0}, "experiment.ranks: must be an integer >= 1"),
])
def test_grid_mistakes_are_one_line_naming_the_key(tmp_path, change, message):
    raw = {"name": "g", "ds_config": "ds_configs/tiny.json", "seeds": [0], "configs": {"a": []}, **change}
    with pytest.raises(ConfigError) as e:
        spec.from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- the table ------------------------------------------------------------------------------------
def test_mean_std_and_the_table_against_hand_values():
    assert results.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(7 / 3)))  # sum sq dev 14/3, / 2
    assert results.mean_std([0.5]) == (0.5, 0.0)
    runs = [{"config": "a", "seed": s, "status": "done", "final": {"m": v, "dropless/val/top1": t}, "train_flops": 10}
            for s, v, t in ((0, 1.0, 0.5), (1, 2.0, 0.25), (2, 4.0, 0.75))]
    runs += [{"config": "b", "seed": 0, "status": "done", "final": {"m": 3.0}, "train_flops": 12},
             {"config": "b", "seed": 1, "status": "failed", "error": "error: boom"}]
    table = results.aggregate(runs, ["a", "b"], ["m", "dropless/val/top1"])
    assert table["a"]["m"] == {"mean": pytest.approx(7 / 3), "std": pytest.approx(1.5275252), "n": 3,
                               "values": [1.0, 2.0, 4.0]}
    assert table["a"]["dropless/val/top1"]["std"] == pytest.approx(0.25) and table["b"]["failed"] == 1
    assert "dropless/val/top1" not in table["b"] and table["b"]["m"]["n"] == 1
    md = results.markdown(table, ["m", "dropless/val/top1"])
    assert "| a | 2.3333 ± 1.5275 (n=3) | 50.00% ± 25.00 (n=3) | 10 (n=3) |" in md
    assert "| b (1 failed) | 3.0000 (n=1) |  | 12 (n=1) |" in md
    cell = {"mean": 1.0, "std": 0.1, "n": 3}
    assert results.verdict({**cell, "mean": 1.3}, cell, higher_is_better=True) == "holds"
    assert results.verdict({**cell, "mean": 1.1}, cell, higher_is_better=True) == "not distinguishable from seed noise"
    assert results.verdict({**cell, "mean": 1.3}, cell, higher_is_better=False) == "does not hold"


def test_metrics_of_a_step_logged_twice_keep_the_last_values_and_a_cut_line_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/total": 5.0}\n{"step": 2, "loss/total": 4.0}\n'
                                            '{"step": 2, "loss/total": 3.5}\n'
                                            '{"step": 2, "dropless/val/contrastive": 3}\n{"step": 3, "loss/to')
    assert results.read_metrics(tmp_path) == {1: {"loss/total": 5.0}, 2: {"loss/total": 3.5,
                                                                          "dropless/val/contrastive": 3}}


# ---- the runner (a fake launch: no training) ------------------------------------------------------
def _fake(code: int, line: str):
    return lambda run, ranks: [sys.executable, "-c", f"import sys; print('warming up'); print({line!r}, "
                                                     f"file=sys.stderr); sys.exit({code})"]


@pytest.mark.integration  # subprocesses (a fake launch, no training: about 1 s)
def test_a_failed_run_is_reported_with_its_error_line_and_the_others_still_run(tmp_path):
    exp = spec.load(_grid(tmp_path, {"a": [], "bad": ["model.width=-3"]}), out=tmp_path / "out")
    printed = []
    rc = runner.Runner(exp, launch=_fake(3, "error: the data ran dry"), print_fn=printed.append).run()
    assert rc == 1
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["config"], r["seed"], r["status"], r["error"]) for r in doc["runs"]] == [
        ("a", 0, "failed", "error: the data ran dry"), ("bad", 0, "failed", "error: model.width: must be > 0, got -3"),
        ("a", 1, "failed", "error: the data ran dry"), ("bad", 1, "failed", "error: model.width: must be > 0, got -3")]
    assert doc["runs"][0]["exit_status"] == 3 and doc["runs"][1]["exit_status"] == 2  # not launched
    assert any(p.startswith("[4/4] bad/seed1: failed in ") for p in printed), printed
    assert "- a/seed0: error: the data ran dry" in (tmp_path / "out" / "results.md").read_text()
    assert "warming up" in (tmp_path / "out" / "a" / "seed0" / "experiment.log").read_text()
    assert runner.Runner(exp, launch=_fake(75, "stopped"), print_fn=printed.append).run() == 75  # a stop request
    assert "stopped by SIGTERM" in printed[-1]


def test_a_run_dir_of_other_settings_is_not_reused(tmp_path):
    exp = spec.load(_grid(tmp_path, {"a": []}, seeds=[0]), out=tmp_path / "out")
    run = exp.runs[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / runner.RESULT).write_text(json.dumps({"fingerprint": {"ds_config": "x", "sets": []}}))
    with pytest.raises(ConfigError, match="holds a run of other settings"):
        runner.Runner(exp, launch=_fake(0, "")).run()


# ---- the runner on the real entry point --------------------------------------------------------------
def _tool(grid: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen([sys.executable, str(TOOL), str(grid), "--out", str(out), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.integration  # the deepspeed launcher, 10 short launches
def test_an_interrupted_grid_resumes_to_the_results_of_an_uninterrupted_one(tmp_path):
    """2 configs x 2 seeds (and a config with a mistake, reported, not stopping the others), one
    rank each, twice at once: straight through, and stopped by SIGTERM during limoe/seed1, its
    fourth run (a checkpoint at the next step boundary, exit 75), then run again (its two finished
    runs skipped, the failed one tried again, limoe/seed1 resumed from its checkpoint). The two
    results.json are the same bytes."""
    grid = _grid(tmp_path, {"limoe": [], "dense": ["model.preset=tiny-dense", "logging.wandb={project: smoke}"],
                            "broken": ["model.moe.num_experts=1"]})
    straight, stopped = _tool(grid, tmp_path / "a"), _tool(grid, tmp_path / "b")
    metrics = tmp_path / "b" / "limoe" / "seed1" / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.is_file() and '"loss/total"' in metrics.read_text()):
        assert stopped.poll() is None and time.time() < deadline, stopped.communicate()[0][-3000:]
        time.sleep(0.1)
    stopped.send_signal(signal.SIGTERM)
    out_b1, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == 75, out_b1[-3000:]
    assert "[4/6] limoe/seed1: stopped by SIGTERM" in out_b1 and not (tmp_path / "b" / "results.json").exists()
    again = _tool(grid, tmp_path / "b")
    out_b2, _ = again.communicate(timeout=600)
    out_a, _ = straight.communicate(timeout=600)
    assert straight.returncode == again.returncode == 1, (out_a[-3000:], out_b2[-3000:])  # broken failed
    assert "[1/6] limoe/seed0: finished earlier, skipped" in out_b2 and "[2/6] dense/seed0: finished earlier" in out_b2
    assert "[3/6] broken/seed0: failed" in out_b2
    assert "resumed from" in (tmp_path / "b" / "limoe" / "seed1" / "experiment.log").read_text()
    a, b = ((tmp_path / d / "results.json").read_text() for d in "ab")
    assert a == b
    doc = json.loads(a)
    assert [r["status"] for r in doc["runs"]] == ["done", "done", "failed"] * 2
    assert doc["runs"][2]["error"].startswith("error: model.moe.num_experts: must be >= 2")
    assert doc["table"]["limoe"]["dropless/val/contrastive"]["n"] == 2
    flops = {c: doc["table"][c]["train_flops"]["mean"] for c in ("limoe", "dense")}
    assert abs(flops["limoe"] / flops["dense"] - 1) < 0.005  # the dense twin: the same per-token compute
    assert doc["runs"][0]["samples"] == 8 * 64 and doc["runs"][0]["eval_step"] == 8
    assert {"curves.png", "final.png", "routing.png", "results.md", "timing.json"} <= {
        p.name for p in (tmp_path / "b").iterdir()}
    assert len(json.loads((tmp_path / "b" / "timing.json").read_text())["limoe/seed1"]) == 2  # two launches
    # --experts: the best limoe seed's two kept checkpoints analysed; the dense config has no experts
    tool = _tool(grid, tmp_path / "a", "--experts")
    out, _ = tool.communicate(timeout=300)
    assert tool.returncode == 0, out[-3000:]
    summary = (tmp_path / "a" / "experts" / "summary.md").read_text().splitlines()
    rows = [ln for ln in summary if ln.startswith("| limoe")]
    best = min((0, 1), key=lambda s: (doc["runs"][3 * s]["final"]["dropless/val/contrastive"], s))
    assert [ln.split(" | ")[1:3] for ln in rows] == [["4", "layer1"], ["4", "layer3"], ["8", "layer1"], ["8", "layer3"]]
    assert all(f"(seed {best})" in ln for ln in rows) and not any(ln.startswith("| dense") for ln in summary)
    # logging.wandb (offline) in a real run: W&B's history holds metrics.jsonl's training losses
    dense = tmp_path / "a" / "dense" / "seed1"
    logged = {row["step"]: row["loss/total"] for row in wandb_history(dense) if "loss/total" in row}
    assert logged == {s: v for s, v in _jsonl(dense, "loss/total").items()} and sorted(logged) == list(range(1, 9))


def test_expert_kinds_and_the_best_seed():
    from limoe_ds.experiments import experts
    assert experts.kinds([0.95, 0.8, 0.5, 0.2, 0.05, float("nan")]) == {"image": 2, "text": 2, "mixed": 1, "dead": 1}
    runs = [{"seed": s, "status": st, "final": {"dropless/val/contrastive": v}}
            for s, st, v in ((0, "done", 3.5), (1, "done", 3.25), (2, "failed", 1.0))]
    assert experts.best_run(runs)["seed"] == 1 and experts.best_run(runs[2:]) is None


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of the offline W&B runs under RUN_DIR/wandb, read from their .wandb files
    (W&B's record log: a 7-byte ':W&B' header, 32 KiB blocks of chunks with a 7-byte header each,
    crc32 / length / type (1 full, 2 first, 3 middle, 4 last), holding protobuf Records)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:  # the zero padding of a block
                pos += left
                continue
            buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({"step": record.history.step.num, **{
                        i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}})
    return rows


@pytest.mark.integration  # W&B starts its own service process
def test_wandb_offline_logs_every_row_image_and_alarm_and_a_resume_keeps_the_run_id(tmp_path):
    """logging.wandb with mode offline: the MetricsLog rows, a text entry and an image go to W&B's
    files under RUN_DIR/wandb and nowhere else; reopening the run directory (a resume) logs to
    the same run id."""
    from PIL import Image
    from limoe_ds.config.run import WandbConfig
    from limoe_ds.train.logging import MetricsLog, wandb_run_id
    cfg = WandbConfig(project="limoe-test")
    log = MetricsLog(tmp_path, tensorboard=False, wandb=cfg, config={"model": {"preset": "tiny"}})
    log.write(1, {"loss/total": 5.5, "routing/layer1/text/success_rate": 0.75})
    log.write(2, {"loss/total": 5.0, "loss/nan": float("nan")})
    log.write(2, {"dropless/val/contrastive": 4.25})
    log.write_text(2, "alarm/router_collapse", "warning: router collapse in MoE layer3")
    log.write_images(2, {"experts/modality": Image.new("RGB", (8, 4), (255, 0, 0))})
    log.close()
    again = MetricsLog(tmp_path, tensorboard=False, wandb=cfg)  # the run resumed
    again.write(3, {"loss/total": 4.5})
    again.close()
    rows = wandb_history(tmp_path)
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(wandb_run_id(tmp_path)) for p in runs)
    assert [(r["step"], r.get("loss/total")) for r in rows] == [(1, 5.5), (2, 5.0), (3, 4.5)]
    step2 = rows[1]
    assert step2["dropless/val/contrastive"] == 4.25 and "loss/nan" not in step2
    assert step2["alarm/router_collapse"] == "warning: router collapse in MoE layer3"
    assert step2["experts/modality/_type"] == "image-file" and step2["experts/modality/width"] == 8
    assert (runs[0] / "files" / step2["experts/modality/path"]).is_file()  # the PNG itself
    assert rows[0]["routing/layer1/text/success_rate"] == 0.75


def test_training_flops_per_sample_by_hand_and_the_twins_of_equal_compute():
    """flops_per_sample: 3 x (2 x positions x active parameters per token + attention's 4 n^2 d per
    block) per modality; the dense and two-tower twins cost what the sparse one-tower preset costs
    (within the router's d x E per token), the classifier the image part only."""
    from limoe_ds.model import build_model, flops_per_sample, param_counts
    tiny = build_model("tiny", device="meta")
    c, cfg = param_counts(tiny), tiny.cfg
    n_img, n_txt = cfg.num_patches, cfg.text_len
    image = 2 * n_img * c["active_params_per_image_token"] + cfg.depth * 4 * n_img ** 2 * cfg.width
    text = 2 * n_txt * c["active_params_per_text_token"] + cfg.depth * 4 * n_txt ** 2 * cfg.width
    assert (n_img, n_txt) == (16, 16)  # 32 px images of 8 px patches, 16 tokens
    assert flops_per_sample(tiny) == {"forward": image + text, "train": 3 * (image + text)}
    train = {p: flops_per_sample(build_model(p, device="meta"))["train"] for p in
             ("tiny-dense", "tiny-2t", "tiny-2t-dense", "tiny-vmoe")}
    assert train["tiny-2t"] == 3 * (image + text)
    router = 3 * 2 * (n_img + n_txt) * 2 * cfg.width * 4  # 2 MoE layers x d x E per token
    assert train["tiny-dense"] == train["tiny-2t-dense"] == 3 * (image + text) - router
    vmoe = build_model("tiny-vmoe", device="meta")
    assert train["tiny-vmoe"] == 3 * (2 * n_img * param_counts(vmoe)["active_params_per_image_token"]
                                      + cfg.depth * 4 * n_img ** 2 * cfg.width)
