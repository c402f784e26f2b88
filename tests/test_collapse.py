"""The router-collapse alarm (limoe_ds.moe.collapse): its verdicts on summaries made by hand, its
config, and a real run driven into collapse."""

from __future__ import annotations

import json
import math

import pytest
import torch

from limoe_ds.config import run as run_config
from limoe_ds.config.errors import ConfigError
from limoe_ds.moe.collapse import CollapseAlarm
from test_train import SHORT, _tiny_raw


def _modality(effective: float, success: float, n: int = 100) -> dict:
    return {"routed_tokens": n, "success_rate": success, "entropy_of_mean": math.log(effective)}


def _summary(image=(4.0, 1.0), text=(4.0, 1.0), text_tokens: int = 100) -> dict:
    return {"layer1": {"image": _modality(*image), "text": _modality(*text, n=text_tokens)}}


def _alarm(windows: int = 3) -> CollapseAlarm:
    return CollapseAlarm({"layer1": {"image": 2.0, "text": 2.0}}, min_success=0.5, windows=windows)


def test_a_streak_of_k_bad_windows_warns_once_then_reports_the_recovery():
    alarm = _alarm()
    assert alarm.observe(10, _summary(text=(1.3, 0.9))) == []
    assert alarm.observe(20, _summary(text=(1.2, 0.9))) == []
    (line,) = alarm.observe(30, _summary(text=(1.1, 0.9)))
    assert line.startswith("warning: router collapse in MoE layer1, text tokens (too few experts) for 3 "
                           "consecutive log windows (steps 10..30): 1.10 effective experts (alarm below 2), "
                           "routing success 0.900 (alarm below 0.5)"), line
    assert alarm.collapsed == [("layer1", "text")]
    assert alarm.observe(40, _summary(text=(1.0, 0.9))) == []  # still collapsed: silent
    (line,) = alarm.observe(50, _summary(text=(3.0, 0.9)))
    assert line.startswith("router collapse over: MoE layer1, text tokens at step 50: 3.00 effective experts")
    assert alarm.collapsed == []


def test_a_good_window_breaks_the_streak_and_each_modality_and_cause_counts_on_its_own():
    alarm = _alarm(windows=2)
    alarm.observe(1, _summary(text=(1.5, 1.0)))
    alarm.observe(2, _summary())  # recovered before the alarm: nothing
    assert alarm.observe(3, _summary(text=(1.5, 1.0))) == [] and alarm.collapsed == []
    lines = alarm.observe(4, _summary(image=(4.0, 0.2), text=(1.5, 0.3)))
    assert len(lines) == 1 and "MoE layer1, text tokens (too few experts and dropped tokens)" in lines[0]
    (line,) = alarm.observe(5, _summary(image=(4.0, 0.2), text=(1.5, 0.3)))
    assert "image tokens (dropped tokens)" in line and "routing success 0.200" in line
    assert sorted(alarm.collapsed) == [("layer1", "image"), ("layer1", "text")]


def test_a_modality_without_tokens_is_not_judged_and_zero_thresholds_never_warn():
    alarm = _alarm(windows=1)
    empty = _summary(text=(1.0, 1.0), text_tokens=0)
    empty["layer1"]["text"].update(success_rate=math.nan, entropy_of_mean=math.nan)
    assert alarm.observe(1, empty) == []  # an image-only model's text
    never = CollapseAlarm({"layer1": {"image": 0.0, "text": 0.0}}, min_success=0.0, windows=1)
    assert never.observe(1, _summary(image=(1.0, 0.0), text=(1.0, 0.0))) == []


def _resolve(*sets: str):
    return run_config.resolve(run_config.apply_overrides(_tiny_raw(), [*SHORT, *sets]), world_size=1)


def test_the_thresholds_default_to_each_layers_s_m_and_bad_values_are_one_line():
    from limoe_ds.model import build_model
    from limoe_ds.moe import collapse
    cfg = _resolve("model.moe.global_entropy_min_experts={image: 3, text: 2}",
                   "logging.router_collapse.min_experts={text: 1.5}")
    assert cfg.logging.router_collapse.min_experts == {"text": 1.5}
    model = build_model(cfg.model, ep_size=1, ep_rank=0, seed=0)
    assert collapse.thresholds(model.moe_layers(), cfg.logging.router_collapse.min_experts) == {
        "layer1": {"image": 3.0, "text": 1.5}, "layer3": {"image": 3.0, "text": 1.5}}
    assert _resolve("logging.router_collapse.min_experts=2").logging.router_collapse.min_experts == {
        "image": 2.0, "text": 2.0}
    for sets, want in ((["logging.router_collapse.min_experts=5"], "min_experts.image: must be <= "
                                                                   "model.moe.num_experts=4"),
                       (["logging.router_collapse.min_experts={audio: 1}"], "unknown modality ['audio']"),
                       (["logging.router_collapse.min_success=1.5"], "min_success: must be in [0, 1]"),
                       (["logging.router_collapse.windows=0"], "windows: must be >= 1"),
                       (["logging.router_collapse.enabled=1"], "router_collapse.enabled: must be true or false"),
                       (["logging.router_collapse.windos=2"], "windos")):
        with pytest.raises(ConfigError, match="logging.router_collapse") as e:
            _resolve(*sets)
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.integration  # the real entry point, one rank, in this process
def test_a_run_driven_into_collapse_warns_in_the_log_and_tensorboard(tmp_path, capsys):
    """Capacity factor 0.05 and no balancing losses: most tokens are dropped at every step; with
    log_every=1 and windows=2 the alarm fires at step 2 for each modality of each MoE layer, on
    rank 0's output, in TensorBoard and in alarm/router_collapse, and not before."""
    from limoe_ds.train.engine import init_distributed
    from limoe_ds.train.trainer import train
    cfg = _resolve("train.steps=3", f"train.run_dir={tmp_path}", "eval.zero_shot=[]", "eval.max_batches=1",
                   "model.moe.capacity_factor=0.05", "model.moe.local_entropy_weight=0",
                   "model.moe.global_entropy_weight=0", "model.moe.importance_weight=0", "model.moe.load_weight=0",
                   "logging.router_collapse.windows=2")
    init_distributed()
    torch.manual_seed(0)
    summary = train(cfg, rank=0, world=1, resume="none")
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if line.startswith("warning: router collapse")]
    assert len(warned) == 4 and summary["router_collapse_alarms"] == warned, out[-3000:]
    assert {(w.split("MoE ")[1].split(",")[0], w.split(", ")[1].split(" ")[0]) for w in warned} == {
        ("layer1", "image"), ("layer1", "text"), ("layer3", "image"), ("layer3", "text")}
    assert all("(dropped tokens)" in w or "(too few experts and dropped tokens)" in w for w in warned)
    assert all("(steps 1..2)" in w for w in warned)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["alarm/router_collapse"] for r in rows if "alarm/router_collapse" in r] == [0, 4, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [e for tag in acc.Tags()["tensors"] if tag.startswith("alarm/router_collapse") for e in acc.Tensors(tag)]
    assert len(texts) == 4 and {e.step for e in texts} == {2}
    assert {e.tensor_proto.string_val[0].decode() for e in texts} == set(warned)


@pytest.mark.integration  # the session's 2-rank reference run (deepspeed launcher), shared, read only
def test_the_reference_run_raises_no_alarm(reference_run):
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["alarm/router_collapse"] for r in rows if "alarm/router_collapse" in r]
    assert logged == [0, 0, 0, 0]
