"""The grid file: a named set of run configurations x seeds (YAML).

    name: claim1                          # the experiment's name ([A-Za-z0-9_.-]+)
    description: LIMoE vs dense vs two-tower at equal training FLOPs
    ds_config: ds_configs/tiny_mix.json   # every config's DeepSpeed JSON unless it gives its own
    ranks: 2                              # processes per run (deepspeed --num_gpus; pinned as parallel.world_size)
    seeds: [0, 1, 2]                      # each sets train.seed and data.seed
    sets: [train.steps=600]               # --set overrides of every run
    configs:                              # name -> its --set overrides, or {ds_config, sets}
      limoe: []
      dense: [model.preset=tiny-dense, parallel.expert_parallel_size=1]
    metrics: [dropless/val/contrastive]   # the table's columns (default: the task's headline metrics)
    out: runs/experiments/claim1          # default runs/experiments/NAME

Run i is seed ``i // len(configs)``, config ``i % len(configs)`` (configs in file order): every
config at the first seed, then every config at the next, so that a grid stopped part way holds
comparable runs; the index is the one a SLURM array task takes. Each run's directory is
``OUT/CONFIG/seedS``. Relative paths are relative to the working directory (the repository root,
as for launch/pretrain.py). A key this module does not know, a config name that is not a plain
name, a seed that is not an integer: one ``ConfigError`` line naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from limoe_ds.config.errors import ConfigError
from limoe_ds.config.errors import check as _check

KEYS = ("name", "description", "ds_config", "ranks", "seeds", "sets", "configs", "metrics", "out")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SEED_KEYS = ("train.seed", "data.seed")
"""The overrides a run's seed sets: the initialisation and router noise, and the data order."""
OWN_KEYS = ("train.run_dir", "parallel.world_size", *SEED_KEYS)
"""Keys the runner sets per run; a grid that sets them itself is refused (its runs would collide)."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a config at a seed."""

    index: int
    config: str
    seed: int
    ds_config: str
    sets: tuple[str, ...]
    """Every --set override of the run, its seed and world size included, its run_dir not."""
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.config}/seed{self.seed}"

    def overrides(self) -> list[str]:
        return [*self.sets, f"train.run_dir={self.run_dir}"]

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs the same run (kept in its result: a changed grid does not reuse it)."""
        return {"ds_config": self.ds_config, "sets": list(self.sets)}


@dataclass
class Experiment:
    name: str
    path: Path
    out: Path
    ranks: int
    seeds: list[int]
    configs: list[str]
    runs: list[RunSpec]
    metrics: list[str] | None = None
    """The table's columns; None: the task's headline metrics (``results.default_metrics``)."""
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def run(self, config: str, seed: int) -> RunSpec:
        return next(r for r in self.runs if r.config == config and r.seed == seed)


def _sets(value: Any, key: str) -> list[str]:
    _check(isinstance(value, list) and all(isinstance(s, str) and "=" in s for s in value), key,
           f"must be a list of KEY=VALUE strings (the --set overrides), got {value!r}")
    for s in value:
        _check(s.split("=", 1)[0] not in OWN_KEYS, key,
               f"{s.split('=', 1)[0]} is set by the runner for each run (seed, run_dir, world size); drop it")
    return list(value)


def load(path: str | Path, *, out: str | Path | None = None) -> Experiment:
    """Read and check a grid file; ``out`` replaces its ``out``."""
    import yaml
    path = Path(path)
    _check(path.is_file(), "experiment", f"{str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(raw, path=path, out=out)


def from_dict(raw: Any, *, path: Path = Path("<dict>"), out: str | Path | None = None) -> Experiment:
    _check(isinstance(raw, Mapping), "experiment", f"{path} must hold a mapping (name, seeds, configs, ...)")
    unknown = sorted(set(raw) - set(KEYS))
    _check(not unknown, f"experiment.{unknown[0] if unknown else ''}", f"unknown key; known: {', '.join(KEYS)}")
    name = raw.get("name")
    _check(isinstance(name, str) and NAME.match(name) is not None, "experiment.name",
           f"must be a plain name ([A-Za-z0-9_.-]+), got {name!r}")
    ranks = raw.get("ranks", 2)
    _check(isinstance(ranks, int) and not isinstance(ranks, bool) and ranks >= 1, "experiment.ranks",
           f"must be an integer >= 1, got {ranks!r}")
    seeds = raw.get("seeds")
    _check(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
           "experiment.seeds", f"must be a non-empty list of integers, got {seeds!r}")
    _check(len(set(seeds)) == len(seeds), "experiment.seeds", f"has duplicates: {seeds}")
    common = _sets(raw.get("sets", []), "experiment.sets")
    default_ds = raw.get("ds_config")
    _check(default_ds is None or isinstance(default_ds, str), "experiment.ds_config", "must be a path")
    configs = raw.get("configs")
    _check(isinstance(configs, Mapping) and configs, "experiment.configs",
           "must map each config name to its --set overrides (a list) or to {ds_config, sets}")
    metrics = raw.get("metrics")
    _check(metrics is None or (isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics)),
           "experiment.metrics", f"must be a non-empty list of metric names, got {metrics!r}")
    root = Path(out if out is not None else raw.get("out") or Path("runs") / "experiments" / name)
    per_config, names = {}, []
    for cname, body in configs.items():
        key = f"experiment.configs.{cname}"
        _check(isinstance(cname, str) and NAME.match(cname) is not None, key,
               "a config name must be a plain name ([A-Za-z0-9_.-]+)")
        if isinstance(body, Mapping):
            extra = sorted(set(body) - {"ds_config", "sets"})
            _check(not extra, f"{key}.{extra[0] if extra else ''}", "unknown key; known: ds_config, sets")
            ds, sets = body.get("ds_config", default_ds), _sets(body.get("sets", []), f"{key}.sets")
        else:
            ds, sets = default_ds, _sets(body if body is not None else [], key)
        _check(isinstance(ds, str), f"{key}.ds_config", "no ds_config: give experiment.ds_config or the config's own")
        names.append(cname)
        per_config[cname] = (ds, sets)
    runs = []
    for seed in seeds:
        for cname in names:
            ds, sets = per_config[cname]
            own = [f"{k}={seed}" for k in SEED_KEYS] + [f"parallel.world_size={ranks}"]
            runs.append(RunSpec(index=len(runs), config=cname, seed=seed, ds_config=ds,
                                sets=tuple([*common, *sets, *own]), run_dir=root / cname / f"seed{seed}"))
    return Experiment(name=name, path=path, out=root, ranks=ranks, seeds=list(seeds), configs=names, runs=runs,
                      metrics=metrics, description=str(raw.get("description") or ""), raw=dict(raw))


def validate(run: RunSpec, ranks: int):
    """The run's resolved config, as launch/pretrain.py would resolve it (a ConfigError otherwise):
    a mistake in the grid is found before any launch."""
    from limoe_ds.config import run as run_config
    return run_config.load(run.ds_config, run.overrides(), world_size=ranks)
