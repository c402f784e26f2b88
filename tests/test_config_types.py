"""Every config value is type-checked against its dataclass annotation (limoe_ds.config.typed),
DeepSpeed's keys too (limoe_ds.config.ds_keys): a wrong type is one ConfigError naming the dotted
key, never a truthy "false", a TypeError on every rank or a traceback inside deepspeed.initialize.

The fields are ENUMERATED from the dataclasses (a new field is covered the day it is added) and the
wrong values are chosen by a small oracle of this file, independent of the validator."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from limoe_ds.config import ds_keys, run as run_config, typed
from limoe_ds.config.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = json.loads((ROOT / "ds_configs" / "tiny.json").read_text())
LEGACY = ROOT / "tests" / "assets" / "legacy" / "ep2" / "step00000002" / "limoe_complete.json"


def _resolve(raw: dict, overrides: list[str] = ()) -> run_config.RunConfig:
    return run_config.resolve(run_config.apply_overrides(raw, list(overrides)), world_size=2, check_paths=False)


# ---- the fields, from the dataclasses ------------------------------------------------------------
def _members(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _leaves(cls: type, key: str) -> list[tuple[str, Any]]:
    """(dotted key, declared type) of every field of ``cls``, recursively: a section is a leaf too
    (a wrong value for the whole section), a list of sections is entered at [0], a per-modality
    mapping at .text."""
    out = []
    for name, tp in typed.hints(cls).items():
        k = f"{key}.{name}" if key else name
        out.append((k, tp))
        for m in _members(tp):
            if dataclasses.is_dataclass(m):
                out += _leaves(m, k)
            elif typing.get_origin(m) is list and dataclasses.is_dataclass(typing.get_args(m)[0]):
                out += _leaves(typing.get_args(m)[0], f"{k}[0]")
            elif typing.get_origin(m) is dict and typing.get_args(m)[1] is not Any:
                out.append((f"{k}.text", typing.get_args(m)[1]))
    return out


LIMOE_FIELDS = [(k, tp) for k, tp in _leaves(run_config.RunConfig, "") if not k.startswith("deepspeed")]
DS_FIELDS = [(k, tp, None) for k, tp in _leaves(ds_keys.DeepSpeedKeys, "")]
DS_FIELDS += [(f"optimizer.params.{k}", tp, None) for k, tp in _leaves(ds_keys.AdamParams, "")]
DS_FIELDS += [(f"scheduler.params.{k}", tp, name) for name, cls in ds_keys.SCHEDULERS.items()
              for k, tp in _leaves(cls, "")]


def test_the_enumeration_reaches_every_section():
    keys = {k for k, _ in LIMOE_FIELDS}
    for k in ("train.activation_checkpointing", "train.seed", "data.seed", "data.shuffle_buffer", "data.crop_scale",
              "data.train[0].weight", "data.val.path", "model.moe.capacity_factor", "model.moe.batch_priority",
              "model.moe.local_entropy_weight.text", "model.moe.layers", "logging.tensorboard",
              "logging.progress_bar", "eval.zero_shot", "parallel.world_size", "tokenizer", "model.embed_dim"):
        assert k in keys, k
    ds = {k for k, _, _ in DS_FIELDS}
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer.type",
              "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.torch_adam", "scheduler.type",
              "scheduler.params.warmup_num_steps", "scheduler.params.cos_min_ratio", "gradient_clipping",
              "bf16.enabled", "fp16.enabled", "zero_optimization.stage"):
        assert k in ds, k
    assert len(LIMOE_FIELDS) >= 70 and len(DS_FIELDS) >= 30, (len(LIMOE_FIELDS), len(DS_FIELDS))


# ---- which values a declared type must refuse (this file's own oracle) ---------------------------
CANDIDATES = ["false", "true", "42", "1.5", "abc", True, False, 0, 1, 1.5, -2, math.nan, None, [1], [1.5], [True],
              ["a"], [0.5, 0.5, 0.5], {"x": "y"}, {"image": "a"}]


def _fits(tp: Any, v: Any) -> bool | None:
    """Whether the declared type takes ``v``; None = the oracle does not decide (a mapping for a
    section: its keys decide, or a path for a source): not used as a wrong value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if len(_members(tp)) > 1:
        verdicts = [_fits(m, v) for m in _members(tp)]
        return True if True in verdicts else None if None in verdicts else False
    if tp is type(None):
        return v is None
    if tp in (bool, int, str):
        return type(v) is tp
    if tp is float:
        return type(v) in (int, float) and math.isfinite(v)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return isinstance(v, list) and len(v) == len(args) and all(_fits(a, x) for a, x in zip(args, v))
    if origin in (tuple, list):
        if dataclasses.is_dataclass(args[0]) and not isinstance(v, list):
            return _fits(args[0], v)  # one section for a list of them
        if not isinstance(v, list):
            return False
        verdicts = [_fits(args[0], x) for x in v]
        return False if False in verdicts else None if None in verdicts else True
    if origin is dict:
        return isinstance(v, dict) and all(_fits(args[1], x) for x in v.values())
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "shorthand", None)
        if isinstance(v, dict) or (shorthand is not None and isinstance(shorthand(v), dict)):
            return None
        return False
    raise AssertionError(f"the oracle does not know {tp!r}")


def _wrong_values(tp: Any) -> list:
    return [v for v in CANDIDATES if _fits(tp, v) is False]


def _set(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key (``data.train[0].weight``) in a raw config, turning a source given as a path
    into a mapping and a single source into a list on the way."""
    tokens = re.findall(r"\[\d+\]|[^.\[\]]+", key)
    node = raw
    for tok, nxt in zip(tokens, tokens[1:]):
        if tok.startswith("["):
            i = int(tok[1:-1])
            if isinstance(node[i], str):
                node[i] = {"path": node[i]}
            node = node[i]
            continue
        child = node.get(tok)
        if nxt.startswith("["):
            child = child if isinstance(child, list) else [child if child is not None else {"path": "x"}]
        elif isinstance(child, (str, list)) and tok in ("train", "val"):
            child = {"path": child}
        elif not isinstance(child, dict):
            child = {"image_tower": {"init": "x"}, "wandb": {"project": "x"}}.get(tok, {})  # its one required field
        node[tok] = child
        node = child
    node[tokens[-1].strip("[]") if not tokens[-1].startswith("[") else int(tokens[-1][1:-1])] = value


TYPE_WORDS = r"(an integer|a number|a finite number|true or false|a string|a list of|a mapping|a path|a source|" \
             r"a preset name)"


def _assert_type_error(raw: dict, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        run_config.resolve(raw, world_size=2, check_paths=False)
    msg = str(e.value)
    assert re.match(rf"{re.escape(key)}(\[\d+\]|\.\w+)*: must be {TYPE_WORDS}", msg), (key, value, msg)
    assert ", got " in msg and "; " in msg.split(", got ", 1)[1], (key, value, msg)  # the value given, then the fix
    if isinstance(value, str) and re.match(rf"{re.escape(key)}: ", msg):
        assert f"the string {value!r}" in msg, msg


@pytest.mark.parametrize("key,tp", LIMOE_FIELDS, ids=[k for k, _ in LIMOE_FIELDS])
def test_every_limoe_field_refuses_every_wrong_type(key, tp):
    wrong = _wrong_values(tp)
    assert wrong, f"{key}: no wrong value derived from {tp!r}"
    for value in wrong:
        raw = copy.deepcopy(TINY)
        if key.startswith("model.text_tower"):  # a field of the text tower: the two-tower twin's
            raw["limoe"]["model"]["preset"] = "tiny-2t"
        _set(raw["limoe"], key, value)
        _assert_type_error(raw, key, value)


@pytest.mark.parametrize("key,tp,scheduler", DS_FIELDS, ids=[f"{s}.{k}" if s else k for k, _, s in DS_FIELDS])
def test_every_deepspeed_key_refuses_every_wrong_type(key, tp, scheduler):
    wrong = _wrong_values(tp)
    assert wrong, f"{key}: no wrong value derived from {tp!r}"
    for value in wrong:
        raw = copy.deepcopy(TINY)
        if scheduler is not None:
            raw["scheduler"] = {"type": scheduler, "params": {"warmup_num_steps": 10}}
        _set(raw, key, value)
        _assert_type_error(raw, key, value)


# ---- right values still load ---------------------------------------------------------------------
def test_right_values_of_every_kind_load():
    cfg = _resolve(TINY, ["model.moe.capacity_factor=2", "data.crop_scale=[0.8, 1]", "model.moe.eval_capacity_factor=2",
                          "model.moe.local_entropy_weight=0.02", "model.moe.global_entropy_weight={text: 0.5}",
                          "model.moe.global_entropy_min_experts=3", "train.activation_checkpointing=true",
                          "logging.tensorboard=false", "model.embed_dim=64", "data.val=[a, b]",
                          "data.train=[[a, b], c, {path: d, weight: 2}]", "parallel.world_size=null",
                          "ds.gradient_clipping=0", "ds.optimizer.params.lr=1", "ds.optimizer.type=adam",
                          "ds.optimizer.params.betas=[0, 0.5]", "ds.bf16.enabled=true"])
    moe = cfg.model.moe
    assert type(moe.capacity_factor) is float and moe.capacity_factor == 2.0            # int for a float
    assert type(moe.eval_capacity_factor) is float and moe.eval_capacity_factor == 2.0  # int for float | None
    assert cfg.data.crop_scale == (0.8, 1.0) and all(type(x) is float for x in cfg.data.crop_scale)  # list: tuple
    assert moe.local_entropy_weight == {"image": 0.02, "text": 0.02}                      # per-modality scalar
    assert moe.global_entropy_weight == {"image": 0.0, "text": 0.5}                       # per-modality mapping
    assert moe.global_entropy_min_experts == {"image": 3.0, "text": 3.0}
    assert cfg.train.activation_checkpointing is True and cfg.logging.tensorboard is False
    assert cfg.model.embed_dim == 64 and cfg.parallel.world_size is None
    assert cfg.data.val.paths == ["a", "b"]                                               # str | list[str]
    assert [s.path for s in cfg.data.train] == [["a", "b"], "c", "d"] and cfg.data.train[2].weight == 2.0
    assert cfg.deepspeed["gradient_clipping"] == 0 and cfg.deepspeed["optimizer"]["params"]["lr"] == 1  # DS: as given
    one = _resolve(TINY, ["data.train={path: a, format: parquet}", "model.moe.eval_capacity_factor=null",
                          "model.moe.global_entropy_min_experts=null"])
    assert [(s.path, s.format) for s in one.data.train] == [("a", "parquet")]             # one source for a list
    assert one.model.moe.eval_capacity_factor is None
    assert one.model.moe.global_entropy_min_experts == {"image": 2.0, "text": 2.0}        # the spec's defaults


@pytest.mark.parametrize("scheduler,params", [
    ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"warmup_num_steps": 10, "warmup_max_lr": 0.002}),
    ("WarmupCosineLR", {"warmup_num_steps": 10, "cos_min_ratio": 0, "warmup_min_ratio": 0.1, "warmup_type": "log"}),
])
def test_every_supported_schedule_loads(scheduler, params):
    raw = copy.deepcopy(TINY)
    raw["scheduler"] = {"type": scheduler, "params": dict(params)}
    cfg = run_config.resolve(raw, world_size=2, check_paths=False)
    want = {**params, "total_num_steps": 500} if scheduler != "WarmupLR" else params
    assert cfg.deepspeed["scheduler"]["params"] == want


def test_to_dict_keeps_the_stored_keys_and_resolves_again():
    """resolved_config.json and the completion markers: the same keys as a marker written before
    the typed check (tests/assets/legacy), and the stored config resolves to the same config."""
    def shape(d):
        return {k: shape(v) for k, v in d.items()} if isinstance(d, dict) else type(d).__name__

    def without_new(d):  # the fields added since the legacy markers were written, at their defaults
        d = copy.deepcopy(d)
        for dotted, default in NEW_FIELDS.items():
            *path, last = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
            node = d
            for p in path:
                node = node[int(p[1:-1])] if p.startswith("[") else node[p]
            assert node.pop(last) == default, dotted
        return d

    legacy = json.loads(LEGACY.read_text())["config"]
    cfg = _resolve(TINY, ["parallel.expert_parallel_size=2"])
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert shape(without_new(stored)) == shape(legacy)
    assert run_config.resolve(stored, world_size=2, check_paths=False) == cfg
    again = run_config.resolve(copy.deepcopy(legacy), world_size=2, check_paths=False)
    assert without_new(json.loads(json.dumps(again.to_dict()))) == legacy


NEW_FIELDS = {"limoe.train.watchdog_seconds": 600.0, "limoe.data.train[0].synthetic": None,
              "limoe.data.val.synthetic": None, "limoe.eval.compositional": [], "limoe.eval.compositional_scenes": 1000,
              "limoe.train.loss": "softmax", "limoe.train.loss_impl": "all_gather", "limoe.model.logit_bias_init": None,
              "limoe.model.text_tower": None, "limoe.train.image_tower": None,
              "limoe.model.moe.modality_capacity": False, "limoe.model.text_input": "tokens",
              "limoe.model.text_font_size": 16, "limoe.model.num_classes": None,
              "limoe.model.moe.modality_experts": False, "limoe.model.moe.text_experts": None,
              "limoe.eval.zero_shot_max_images": 0, "limoe.logging.wandb": None,
              "limoe.logging.router_collapse": {"enabled": True, "min_experts": None, "min_success": 0.5,
                                                "windows": 3}}
"""Config fields added after tests/assets/legacy was written (dotted key in to_dict() -> default)."""


# ---- the cases of the issue ----------------------------------------------------------------------
ISSUE = [
    ({"train": {"activation_checkpointing": "false"}}, [],
     "train.activation_checkpointing: must be true or false (a JSON boolean), got the string 'false'; "
     "write false without quotes"),
    ({"logging": {"tensorboard": "false"}}, [], "logging.tensorboard: must be true or false"),
    ({"logging": {"progress_bar": "false"}}, [], "logging.progress_bar: must be true or false"),
    ({"model": {"preset": "tiny", "moe": {"batch_priority": "false"}}}, [],
     "model.moe.batch_priority: must be true or false"),
    ({"train": {"seed": "42"}}, [], "train.seed: must be an integer, got the string '42'; write 42 without quotes"),
    ({}, ["train.seed=abc"], "train.seed: must be an integer, got the string 'abc'"),
    ({}, ["data.seed=1.5"], "data.seed: must be an integer, got 1.5; give a whole number"),
    ({}, ["ds.optimizer.params.lr=-0.001"], "optimizer.params.lr: must be > 0, got -0.001"),
    ({}, ["ds.gradient_clipping=-1"], "gradient_clipping: must be >= 0, got -1"),
    ({"data": {"shuffle_buffer": "1000"}}, [],
     "data.shuffle_buffer: must be an integer, got the string '1000'; write 1000 without quotes"),
    ({}, ["model.moe.capacity_factor='1.5'"],
     "model.moe.capacity_factor: must be a number, got the string '1.5'; write 1.5 without quotes"),
    ({}, ["data.train=[a, {path: b, weight: heavy}]"],
     "data.train[1].weight: must be a number, got the string 'heavy'"),
    ({}, ["model.moe.local_entropy_weight={text: '0.1'}"], "model.moe.local_entropy_weight.text: must be a number"),
    ({}, ["ds.optimizer.params.momentum=0.9"], "optimizer.params.momentum: unknown key; valid keys are"),
    ({}, ["ds.optimizer.type=SGD"], "optimizer.type: 'SGD' is not supported by limoe_ds"),
    ({}, ["ds.optimizer.params.betas=[0.9, 1]"], "optimizer.params.betas[1]: must be in [0, 1)"),
    ({}, ["ds.optimizer.params.eps=0"], "optimizer.params.eps: must be > 0"),
    ({}, ["ds.optimizer.params.weight_decay=-0.1"], "optimizer.params.weight_decay: must be >= 0"),
    ({}, ["ds.scheduler.type=OneCycle"], "scheduler.type: 'OneCycle' is not supported"),
    ({}, ["ds.scheduler.params.warmup_num_steps=0"], "scheduler.params.warmup_num_steps: must be >= 1"),
    ({}, ["ds.scheduler.params.warmup_num_steps=501"], "scheduler.params.warmup_num_steps: must be <= train.steps"),
    ({}, ["ds.scheduler.params.cos_min_ratio=2"], "scheduler.params.cos_min_ratio: must be in [0, 1]"),
    ({}, ["ds.scheduler.params.warmup_type=cosine"], "scheduler.params.warmup_type: must be one of ['log', 'linear']"),
    ({}, ["ds.scheduler.params.warmup_max_lr=0.1"], "scheduler.params.warmup_max_lr: unknown key"),
    ({}, ["ds.bf16.enabled=true", "ds.fp16.enabled=true"], "fp16.enabled: bf16.enabled and fp16.enabled are both"),
    ({}, ["ds.scheduler=null"], "scheduler: must be a mapping"),
    ({}, ["ds.optimizer.params.lr=.nan"], "optimizer.params.lr: must be a finite number"),
]


def _issue_raw(limoe: dict) -> dict:
    raw = copy.deepcopy(TINY)
    for section, values in limoe.items():
        raw["limoe"].setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("limoe,sets,message", ISSUE, ids=[m.split(":")[0] + (f"={s[0]}" if s else "")
                                                          for _, s, m in ISSUE])
def test_issue_cases_name_the_key(limoe, sets, message):
    with pytest.raises(ConfigError) as e:
        _resolve(_issue_raw(limoe), sets)
    assert str(e.value).startswith(message), str(e.value)


def test_deepspeed_without_scheduler_warmup_is_checked_against_its_default():
    raw = copy.deepcopy(TINY)
    del raw["scheduler"]["params"]["warmup_num_steps"]  # DeepSpeed would warm up for 1000 of the 500 steps
    with pytest.raises(ConfigError, match=r"^scheduler.params.warmup_num_steps: must be <= train.steps \(500\), "
                                          r"got 1000 \(DeepSpeed's default"):
        run_config.resolve(raw, world_size=2, check_paths=False)
    longer = run_config.resolve(run_config.apply_overrides(raw, ["train.steps=1000"]), world_size=2,
                                check_paths=False)
    assert "warmup_num_steps" not in longer.deepspeed["scheduler"]["params"]  # DeepSpeed's default, as given


@pytest.mark.parametrize("name,world", [("tiny", 2), ("s32", 8), ("b16", 32), ("l16", 64), ("h14", 256)])
def test_the_project_configs_pass_the_typed_check(name, world):
    cfg = run_config.load(ROOT / "ds_configs" / f"{name}.json", world_size=world, check_paths=False)
    ds_keys.check(cfg.deepspeed)


# ---- through the real entry point: exit 2, one line, no process group ----------------------------
CLI = [
    ({"train": {"activation_checkpointing": "false"}}, [], "train.activation_checkpointing"),
    ({}, ["train.seed=abc"], "train.seed"),
    ({}, ["ds.optimizer.params.lr=-0.001"], "optimizer.params.lr"),
    ({"data": {"shuffle_buffer": "1000"}}, [], "data.shuffle_buffer"),
    ({}, ["model.moe.capacity_factor='1.5'"], "model.moe.capacity_factor"),
]


@pytest.mark.parametrize("limoe,sets,key", CLI, ids=[c[2] for c in CLI])
def test_entry_point_exits_2_with_one_line_before_any_process_group(tmp_path, monkeypatch, capsys, limoe, sets, key):
    from limoe_ds.train.cli import main
    raw = _issue_raw(limoe)
    raw["limoe"]["tokenizer"] = str(ROOT / "data" / "mini" / "tokenizer.json")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    import limoe_ds.train.engine

    def refused():
        raise AssertionError("the entry point went on to start the process group")
    monkeypatch.setattr(limoe_ds.train.engine, "init_distributed", refused)
    initialized = torch.distributed.is_initialized()  # an earlier test of this process may have left one
    capsys.readouterr()  # DeepSpeed's first import warns on stderr
    rc = main(["--deepspeed_config", str(path), *(["--set", *sets] if sets else [])])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"error: {key}: "), err
    assert "Traceback" not in out.err + out.out
    assert torch.distributed.is_initialized() == initialized  # and the unit-test guard would have raised


# ---- the other typed inputs tools read -----------------------------------------------------------
def _model_summary():
    import importlib.util
    spec = importlib.util.spec_from_file_location("model_summary", ROOT / "tools" / "model_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_summary_reads_the_json_with_the_same_types(tmp_path, capsys):
    tool = _model_summary()
    raw = copy.deepcopy(TINY)
    raw["bf16"] = {"enabled": "false"}  # was bool("false") = True: a bf16 estimate for an fp32 run
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    assert tool.main([str(path), "--layout", "ep=2,dp=2"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if not ln.startswith("[")]  # DeepSpeed's accelerator notice, when the model build first imports it
    assert err == ["error: bf16.enabled: must be true or false (a JSON boolean), got the string 'false'; "
                   "write false without quotes"], err
    raw["bf16"] = {"enabled": False}
    raw["limoe"]["train"]["activation_checkpointing"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"^train.activation_checkpointing: must be true or false"):
        tool._run_defaults(str(path))
    raw["limoe"]["train"]["activation_checkpointing"] = True
    path.write_text(json.dumps(raw))
    assert tool._run_defaults(str(path)) == {"zero_stage": 1, "bf16": False, "micro_batch": 64,
                                             "activation_checkpointing": True}


@pytest.mark.parametrize("change,message", [
    ({"num_samples": "10000"}, "num_samples: must be an integer, got the string '10000'; write 10000 without quotes"),
    ({"seen_classes": [0, "1"]}, "seen_classes[1]: must be an integer"),
    ({"shards": "test-000.tar"}, "shards: must be a list of strings"),
    ({"name": None}, "name: must be a string, got null"),
])
def test_zero_shot_info_is_type_checked(tmp_path, change, message):
    from limoe_ds.data.errors import DataError
    from limoe_ds.data.zeroshot import load_zeroshot_set
    info = {"name": "zs", "num_samples": 10000, "shards": ["test-000.tar"], "seen_classes": [0, 1],
            "unseen_classes": [2], "class_counts": [1, 2, 3]}
    (tmp_path / "classnames.txt").write_text("a\nb\nc\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n")
    (tmp_path / "info.json").write_text(json.dumps(info))
    zs = load_zeroshot_set(str(tmp_path))
    assert (zs.name, zs.num_samples, zs.seen_classes, zs.unseen_classes) == ("zs", 10000, [0, 1], [2])
    (tmp_path / "info.json").write_text(json.dumps({**info, **change}))
    with pytest.raises(DataError) as e:
        load_zeroshot_set(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'info.json'}: {message}"), str(e.value)


def test_a_preset_with_another_expert_count_gets_that_counts_default_thresholds():
    """S_m defaults to max(2, E/2) for images and max(2, E/4) for text: a preset whose num_experts is
    overridden derives them for the new E (not the preset's 4), unless they are given."""
    moe = _resolve(TINY, ["model.moe.num_experts=16", "parallel.expert_parallel_size=1"]).model.moe
    assert moe.global_entropy_min_experts == {"image": 8.0, "text": 4.0}
    given = _resolve(TINY, ["model.moe.num_experts=16", "parallel.expert_parallel_size=1",
                            "model.moe.global_entropy_min_experts=3"]).model.moe
    assert given.global_entropy_min_experts == {"image": 3.0, "text": 3.0}
    assert _resolve(TINY).model.moe.global_entropy_min_experts == {"image": 2.0, "text": 2.0}


def test_a_config_file_that_is_not_a_json_object_is_one_error(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^--deepspeed_config: .* holds a JSON list, not an object"):
        run_config.load(path, ["train.steps=3"], world_size=1, check_paths=False)
