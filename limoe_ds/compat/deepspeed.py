"""Every workaround for DeepSpeed 0.19.8, one function each, in one place.

Each docstring says what DeepSpeed does wrong (or what of its private state we touch), how we found
it, and the test that proves the workaround. ``deepspeed()`` checks the version first: another
DeepSpeed fails with a one-line ``CompatError`` (a ValueError, so the entry points print
``error: ...`` and exit 2), so that an upgrade is a deliberate act: re-run the tests named here
against the new version, adapt or drop each workaround, then change ``DEEPSPEED_VERSION`` and the
pin in setup.py together.

Importing this module is cheap (DeepSpeed is imported on the first call that needs it), so the
config validation can ask ``zero0_clipping_problem`` before any process group exists.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

DEEPSPEED_VERSION = "0.19.8"


class CompatError(ValueError):
    """The installed DeepSpeed is not the version these workarounds were written and tested for."""


def check_version(version: str) -> None:
    if version != DEEPSPEED_VERSION:
        raise CompatError(f"deepspeed {version} is installed; limoe_ds works around bugs of deepspeed "
                          f"{DEEPSPEED_VERSION} (limoe_ds/compat/deepspeed.py): pip install "
                          f"deepspeed=={DEEPSPEED_VERSION}, or port each workaround there and its test "
                          f"before upgrading")


@functools.cache
def deepspeed():
    """The ``deepspeed`` module, imported quietly (``quiet_import``) and version-checked."""
    with quiet_import():
        import deepspeed as ds
    check_version(ds.__version__)
    silence_all_gather_deprecation()
    return ds


@contextlib.contextmanager
def quiet_import():
    """Import DeepSpeed modules inside this.

    DeepSpeed's logger writes to stdout from the moment it is imported (its accelerator warning);
    importing it with stdout redirected points that handler at stderr for good, so the project's own
    stdout (JSON from tools, the training summary) stays clean. Found: tools printing JSON that
    ``json.loads`` rejected. Test: tests/test_diagnostics_and_tools.py::test_model_summary_prints_json_for_h14_on_meta.
    """
    with contextlib.redirect_stdout(sys.stderr):
        yield


def silence_all_gather_deprecation() -> None:
    """DeepSpeed 0.19.8's ZeRO all-gather calls ``torch.distributed.all_gather_into_tensor``, which
    torch 2.13 deprecates: a FutureWarning on every rank, again after every evaluation of
    ``make train`` (seen in its output). Not ours to change; filtered by its exact message."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


@contextlib.contextmanager
def chatter_to_stderr(rank: int):
    """DeepSpeed prints set-up chatter to stdout on every rank (init_distributed, initialize): rank
    0's goes to stderr, the other ranks' is dropped (their warnings and errors still reach stderr
    through DeepSpeed's logger). Test: the launched runs of tests/test_train.py parse the summary
    JSON from stdout."""
    if rank == 0:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _groups():
    deepspeed()
    from deepspeed.utils import groups
    return groups


def unlink_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates a 66 MB ``/dev/shm`` buffer per rank (RAM)
    when all ranks share a machine and never unlinks it; a test suite's runs filled 20 GB of 24 and
    CI was OOM-killed (found by counting /dev/shm after the suite). Every rank maps all its peers'
    buffers inside ``init_distributed``, so after one barrier each rank unlinks its own name; the
    memory is freed when the processes exit, however they end (``limoe_ds.runtime.shm``; stale
    ones: tools/clean_shm.py). Tests: tests/test_train.py::test_resume_after_kill_9_continues_bitwise
    (no buffer left by finished and SIGKILLed runs), tests/test_shm.py."""
    import torch.distributed as dist
    from limoe_ds.runtime import shm
    if dist.get_world_size() > 1:
        dist.barrier()
    shm.unlink_own(dist.get_rank())


def register_expert_groups(name: str, expert_groups: list[tuple[list[int], object]],
                           expert_data_groups: list[tuple[list[int], object]]) -> None:
    """Write our expert and expert-data groups into DeepSpeed's PRIVATE group tables under the name
    DeepSpeed-MoE looks up (``ep_size_<ep>``), so that it does not build its own.

    DeepSpeed 0.19.8 given an mpu builds expert groups from consecutive GLOBAL ranks, i.e. a
    tensor-parallel group, which is wrong with megatron's rank order (found when TP2 x EP2 routed
    tokens between tp peers). Each entry: (ranks, group) of this rank's group. Test:
    tests/test_distributed.py::test_process_groups_and_initialisation (membership against the
    layout for every case)."""
    groups = _groups()
    (ranks, group), = expert_groups
    groups._EXPERT_PARALLEL_GROUP[name], groups._EXPERT_PARALLEL_GROUP_RANKS[name] = group, list(ranks)
    (ranks, group), = expert_data_groups
    groups._EXPERT_DATA_PARALLEL_GROUP[name], groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = group, list(ranks)


def clear_groups() -> None:
    """Forget what ``register_expert_groups`` and ``deepspeed.initialize(mpu=...)`` left in
    DeepSpeed's module-level tables, so that the next layout (a test's next case, a reshard) starts
    clean. Test: tests/test_distributed.py runs several layouts in one process."""
    groups = _groups()
    for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        table.clear()
    groups.mpu = None


def gather_tokens_on_gloo(tp_group) -> None:
    """DeepSpeed-MoE's tensor-parallel token gather (``deepspeed.moe.mappings._gather_tokens``)
    all-gathers into a FLAT buffer, which NCCL accepts and gloo rejects ('invalid tensor size'):
    found by the TP2 x EP2 cases on CPU. On gloo gather into a buffer shaped [tp * n, ...] instead;
    same result. The GPU (NCCL) path stays DeepSpeed's own: call this only on gloo. Test:
    tests/test_distributed.py::test_layout_equals_single_process[TP=2 x EP=2 ...]."""
    import torch
    import torch.distributed as dist
    deepspeed()
    from deepspeed.moe import mappings

    def gather_tokens(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
        group = tp_group()
        world = dist.get_world_size(group)
        input_ = input_.contiguous()
        if world == 1:
            return input_
        out = input_.new_empty((world * input_.shape[0], *input_.shape[1:]))
        dist.all_gather_into_tensor(out, input_, group=group)
        return out if dim == 0 else torch.cat(out.chunk(world, dim=0), dim=dim).contiguous()

    mappings._gather_tokens = gather_tokens


@contextlib.contextmanager
def one_checkpoint_writer_per_tp_lane(lane_rank: int | None):
    """While DeepSpeed saves: one writer per tensor-parallel lane, not one per expert-data group.

    DeepSpeed 0.19.8 lets only rank 0 of an expert-data group write the experts AND (it returns
    early otherwise) the shared ``mp_rank_XX_model_states.pt``. Our expert-data groups span the tp
    peers, so tp ranks > 0 would write neither and their attention / MLP shards would be lost
    (found: a TP=2 checkpoint had only mp_rank_00). ``lane_rank`` (None = nothing to do, tp=1): the
    rank's index among the ranks of its OWN lane holding the same experts; the data-parallel-rank-0
    rank of every lane then writes its model shard (mp_rank_<tp rank>) and its (replicated) expert
    files, which is what a resume at the same layout loads. Tests:
    tests/test_train.py::test_tensor_parallel_2_run_resumes_bitwise_and_evaluates_on_one_rank,
    tests/test_legacy_checkpoints.py (tp2)."""
    if lane_rank is None:
        yield
        return
    groups = _groups()
    original = groups._get_expert_data_parallel_rank
    groups._get_expert_data_parallel_rank = lambda _group_name: lane_rank
    try:
        yield
    finally:
        groups._get_expert_data_parallel_rank = original


def tag_experts_tensor_parallel(model, ds_config: dict) -> None:
    """Under ZeRO 1/2 with tensor parallelism, tag expert parameters ``tensor_model_parallel``.

    Experts are replicated over tp peers, and ZeRO 1/2 partition their gradients over the
    expert-data group, which spans the tp peers: each peer holds DIFFERENT expert gradient entries.
    DeepSpeed 0.19.8's gradient norm counts an untagged parameter on tp rank 0 only (it assumes tp
    peers hold copies) and missed the other peers' parts (found: the TP2 x EP2 ZeRO-1/2 grad norm
    differed from one process's); tagged, every peer's part is counted once. Under ZeRO 0 every peer
    holds the full, reduced copy: nothing to do. Test: tests/test_distributed.py::
    test_layout_equals_single_process[TP=2 x EP=2 ZeRO-1/2 clip=1.0] (global gradient norm)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) not in (1, 2):
        return
    deepspeed()
    from deepspeed.moe.utils import is_moe_param
    for p in model.parameters():
        if is_moe_param(p):
            p.tensor_model_parallel = True


def init_moe_fields(layer, *, ep_size: int, num_experts: int) -> str:
    """Set the fields ``deepspeed.moe.layer.MoE.__init__`` would set, without calling it.

    MoE.__init__ always builds DeepSpeed's stock TopKGate and experts; our layer is a DeepSpeed
    ``MoE`` (so the engine finds it, builds expert-parallel groups and splits expert parameters for
    ZeRO) with our own gate, so it skips that constructor and sets what the engine reads. Returns the
    expert group name. Test: tests/test_train.py::test_weight_decay_only_on_matrices_and_experts_in_moe_groups
    (the engine's MoE optimizer groups), tests/test_moe_layer.py."""
    layer.use_residual = False
    layer.enable_expert_tensor_parallelism = False
    layer.ep_size = ep_size
    layer.expert_group_name = f"ep_size_{ep_size}"
    layer.num_experts = num_experts
    layer.num_local_experts = num_experts // ep_size
    return layer.expert_group_name


def prepare_adam_state_for_fill(engine, template: dict) -> None:
    """Give a fresh ZeRO 1/2 optimizer the Adam state structure it has after a step (zero moments,
    the source's step count and hyperparameters), so that ``safe_set_full_optimizer_state`` has
    DeepSpeed's fragment views to fill: they exist only once ``_lazy_init_hp_params_optimizer_state``
    ran, which DeepSpeed does at the first step (found: reshard wrote zeros). Touches DeepSpeed's
    private ``single_partition_of_fp32_groups`` and ``_hp_optimizer_states_linked``. Test:
    tests/test_convert.py::test_reshard_ep2_to_1_to_2_and_to_tp2_keeps_adam_state_and_the_loss_curve."""
    import torch
    opt = engine.optimizer
    base = opt.optimizer
    for g, (group, flat) in enumerate(zip(base.param_groups, opt.single_partition_of_fp32_groups)):
        base.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in template["state"][g].items()}
        base.state[flat].update({k: torch.zeros_like(flat) for k in template["partition_keys"][g]})
        group.update(template["param_groups"][g])
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def zero0_clipping_problem(ds_config: dict, ep: int) -> str | None:
    """Why a ZeRO-0 run with gradient clipping and expert parallelism would be silently wrong, or None.

    DeepSpeed 0.19.8's ZeRO-0 clipping (runtime/utils.py clip_grad_norm_) AVERAGES each rank's norm
    over data-parallel ranks; with sharded experts each rank's norm covers different experts, so it
    clips with a wrong norm (found by tests/test_distributed.py against one process). ZeRO 1/2 are
    exact. Test: tests/test_train.py::test_bad_config_exits_2_with_one_line[zero 0 clipping with ep]."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and ep > 1 and ds_config.get("gradient_clipping", 0) > 0:
        return ("stage 0 with gradient_clipping and expert_parallel_size > 1 clips by a wrong gradient norm in "
                "DeepSpeed 0.19.8 (it averages per-rank norms); use stage 1 or 2, or gradient_clipping 0")
    return None


@contextlib.contextmanager
def zero_without_expert_groups(has_expert_group: bool):
    """While DeepSpeed builds a ZeRO 1/2 optimizer for a model with MoE layers whose experts are all
    frozen (a locked sparse image tower with a dense text tower, train.image_tower): no group holds
    experts.

    DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer._configure_moe_settings`` asserts that some optimizer
    group is an MoE group whenever the model has MoE layers (found: LiT from a sparse export with a
    dense text tower stopped on that assertion). The engine must still see the MoE layers (they
    save their experts in the per-expert checkpoint files), so instead the check is skipped when no
    group is MoE: every group is then dense (``is_moe_param_group`` all False), which is what the
    rest of the optimizer reads. Test: tests/test_family.py::test_lit_runs_resumes_reshards_and_exports."""
    if has_expert_group:
        yield
        return
    deepspeed()
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    original = DeepSpeedZeroOptimizer._configure_moe_settings

    def configure(self):
        if any(self.is_moe_group(g) for g in self.optimizer.param_groups):
            return original(self)
        self.is_moe_param_group = [False] * len(self.optimizer.param_groups)

    DeepSpeedZeroOptimizer._configure_moe_settings = configure
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer._configure_moe_settings = original
