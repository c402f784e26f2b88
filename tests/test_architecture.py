"""The import rules of docs/ARCHITECTURE.md, checked on the source (static: no import runs).

Each rule names the subpackages a module may not import. Top-level (module-level) imports and lazy
ones inside functions both count, except where a rule says "at import time" (only module-level
statements, which decide what importing the module costs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "limoe_ds"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level statements, including those nested in with/try/if blocks
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _hits(imported: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imported if any(i == b or i.startswith(b + ".") for b in banned))


HEAVY = ("torch", "deepspeed", "megatron", "numpy", "datasets", "PIL")
RULES = [
    # (module prefix, banned imports, top-level only, why)
    ("limoe_ds.config", HEAVY + ("limoe_ds.model", "limoe_ds.moe", "limoe_ds.parallel", "limoe_ds.train",
                                 "limoe_ds.checkpoint", "limoe_ds.eval"), True,
     "configs validate before any process group: importing them costs no torch"),
    ("limoe_ds.runtime", HEAVY + ("limoe_ds.model", "limoe_ds.moe", "limoe_ds.parallel", "limoe_ds.train",
                                  "limoe_ds.checkpoint", "limoe_ds.eval", "limoe_ds.data", "limoe_ds.config"), True,
     "launch/pretrain.py installs the preemption handlers through it before torch is imported"),
    ("limoe_ds.compat", HEAVY, True, "compat imports DeepSpeed on first use, so config can ask it questions"),
    ("limoe_ds.model", ("limoe_ds.train", "limoe_ds.checkpoint", "limoe_ds.eval", "limoe_ds.data",
                        "limoe_ds.parallel", "deepspeed", "megatron"), False,
     "the model is a plain module; parallelism is applied from outside"),
    ("limoe_ds.moe.routing", ("torch.distributed", "deepspeed", "limoe_ds.parallel", "limoe_ds.moe.layer"), False,
     "routing is a pure function"),
    ("limoe_ds.moe.stats", ("deepspeed", "limoe_ds.moe.layer", "limoe_ds.model", "limoe_ds.train"), False,
     "statistics are values"),
    ("limoe_ds.moe.names", HEAVY, False, "a name parser"),
    ("limoe_ds.parallel", ("limoe_ds.train", "limoe_ds.checkpoint", "limoe_ds.eval", "limoe_ds.data"), False,
     "parallelism knows layouts and groups, not the loop or its files"),
    ("limoe_ds.data", ("limoe_ds.model", "limoe_ds.moe", "limoe_ds.parallel", "limoe_ds.train",
                       "limoe_ds.checkpoint", "limoe_ds.eval", "deepspeed", "megatron"), False,
     "the data pipeline knows shards and samples only"),
    ("limoe_ds.checkpoint", ("limoe_ds.train.trainer", "limoe_ds.train.cli", "limoe_ds.train.logging",
                             "limoe_ds.eval"), False, "checkpoints are files and engines, not the loop"),
    ("limoe_ds.eval", ("limoe_ds.train", "limoe_ds.checkpoint"), False, "evaluation takes a model and data"),
    ("limoe_ds.experiments", ("limoe_ds.train", "limoe_ds.checkpoint", "limoe_ds.parallel", "limoe_ds.data",
                              "deepspeed", "megatron"), False,
     "the experiment runner launches runs through the entry point; it does not run them"),
    ("limoe_ds", ("tests", "tools", "launch"), False, "the library never imports its callers"),
]
DEEPSPEED_USERS = {"limoe_ds.compat.deepspeed", "limoe_ds.moe.layer", "limoe_ds.train.engine",
                   "limoe_ds.checkpoint.reshard"}
"""The only modules that import DeepSpeed itself (private state: compat.deepspeed only)."""


@pytest.mark.parametrize("prefix,banned,top_level,why", RULES, ids=[r[0] for r in RULES])
def test_import_rules(prefix, banned, top_level, why):
    broken = {}
    for name, path in _modules():
        if name == prefix or name.startswith(prefix + "."):
            hits = _hits(_imports(path, top_level_only=top_level), banned)
            if hits:
                broken[name] = hits
    assert not broken, f"{why}: {broken}"


def test_deepspeed_and_megatron_are_imported_in_few_places():
    ds = {name for name, path in _modules() if _hits(_imports(path, top_level_only=False), ("deepspeed",))}
    mg = {name for name, path in _modules() if _hits(_imports(path, top_level_only=False), ("megatron",))}
    assert ds == DEEPSPEED_USERS
    assert mg == {"limoe_ds.compat.megatron"}
