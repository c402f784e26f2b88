"""Routing diagnostics and tools/model_summary.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from limoe_ds.config.model import MoEConfig
from limoe_ds.moe import stats
from limoe_ds.moe.routing import TOKEN_IMAGE, TOKEN_PAD, TOKEN_TEXT, route_top1

ROOT = Path(__file__).resolve().parents[1]


def _stats(logits, types, capacity):
    cfg = MoEConfig(num_experts=logits.shape[1], layers=(0,))
    return [stats.RoutingStats.of(2, route_top1(logits, types, cfg, capacity=capacity), capacity)]


def test_success_rate_is_one_minus_drop_rate_and_shares_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 4, generator=gen)
    types = torch.tensor([TOKEN_IMAGE] * 32 + [TOKEN_TEXT] * 20 + [TOKEN_PAD] * 8)
    total = {}
    for _ in range(2):  # accumulating two identical batches changes no ratio
        stats.accumulate(total, _stats(logits, types, capacity=8))
    layer = stats.summarize(total)["layer2"]
    for m, n in (("image", 64), ("text", 40)):
        assert layer[m]["routed_tokens"] == n
        assert layer[m]["success_rate"] == pytest.approx(1 - layer[m]["dropped_tokens"] / n)
        assert max(layer[m]["tokens_per_expert"]) <= 16  # capacity 8 per batch, two batches
    kept = [a + b for a, b in zip(layer["image"]["tokens_per_expert"], layer["text"]["tokens_per_expert"])]
    text_share = [t / k for t, k in zip(layer["text"]["tokens_per_expert"], kept)]
    for img, txt in zip(layer["image_share_per_expert"], text_share):
        assert img + txt == pytest.approx(1.0, abs=1e-4)


def test_collapsed_router_is_reported_as_such():
    logits = torch.tensor([[9.0, 0, 0, 0]] * 24)  # every token prefers expert 0
    types = torch.tensor([TOKEN_IMAGE] * 12 + [TOKEN_TEXT] * 12)
    layer = stats.summarize(stats.accumulate({}, _stats(logits, types, capacity=8)))["layer2"]
    assert layer["dead_experts"] == [1, 2, 3]
    assert layer["image"]["success_rate"] + layer["text"]["success_rate"] < 1.0  # only 8 of 24 kept
    assert layer["text"]["entropy_of_mean"] == pytest.approx(0.0, abs=1e-2)
    assert math.isnan(layer["image_share_per_expert"][1])


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # tools/model_summary.py in a subprocess
def test_model_summary_prints_json_for_h14_on_meta():
    r = _run("tools/model_summary.py", "h14")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # stdout is pure JSON (DeepSpeed's logs go to stderr)
    assert d["total_params"] == 5553772801 and d["active_params_per_token"] == 675513601
    assert d["num_experts"] == 32 and len(d["moe_layers"]) == 12


@pytest.mark.integration  # tools/model_summary.py in a subprocess
def test_model_summary_bad_preset_exits_2():
    r = _run("tools/model_summary.py", "x99")
    assert r.returncode == 2
    assert "unknown preset 'x99'" in r.stderr


@pytest.mark.integration  # tools/model_summary.py in a subprocess
def test_model_summary_layout_estimate_by_hand_and_bad_layouts():
    # h14 at tp=1, ep=32: 675,513,601 params per GPU = the active parameters per token (one expert
    # per layer), as checked above; ZeRO-2 bf16: weights 2 bytes each
    r = _run("tools/model_summary.py", "h14", "--layout", "ep=32,dp=256", "--micro-batch", "64")
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout)["memory_per_gpu"]
    assert mem["params_per_rank"] == 675513601 and mem["world_size"] == 256
    assert mem["weights_gib"] == pytest.approx(2 * 675513601 / 2 ** 30, abs=1e-3)
    # ZeRO-2: gradients and the 12-byte optimizer state partitioned over dp (shared) / dp*tp/ep (experts)
    shared, expert = mem["shared_params_per_rank"], mem["expert_params_per_rank"]
    assert mem["optimizer_gib"] == pytest.approx(12 * (shared / 256 + expert / 8) / 2 ** 30, abs=1e-3)
    assert mem["total_gib"] == pytest.approx(sum(mem[k] for k in ("weights_gib", "gradients_gib", "optimizer_gib",
                                                                   "activations_gib")), abs=2e-3)
    for layout, message in (("tp=3,dp=8", "tp=3 does not divide model.num_heads=16"), ("ep=5,dp=10", "num_experts=32"),
                            ("ep=2", "dp=N"), ("tp=x,dp=2", "expected tp=N,ep=N,dp=N")):
        r = _run("tools/model_summary.py", "h14", "--layout", layout)
        assert r.returncode == 2 and message in r.stderr, (layout, r.stderr)
