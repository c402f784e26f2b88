"""The LIMoE MoE feed-forward layer on DeepSpeed-MoE.

We keep DeepSpeed's ``MoE`` wrapper (so the engine finds the layer, builds expert-parallel groups
and splits expert parameters for ZeRO), its ``Experts`` container and its ``MOELayer`` sparse
dispatch and all-to-all, and replace only the gate: ``LIMoEGate`` is a thin adapter around the
pure function ``limoe_ds.moe.routing.route_top1``.

DeepSpeed's ``MOELayer.forward(x, used_token)`` hands ``used_token`` to the gate untouched; we pass
the pool's token types there (0 = padding, 1 = image, 2 = text) so the gate knows each token's
modality. The gate keeps the last ``Routing`` for ``LIMoELayer.forward`` to return (read once and
cleared, right after the call, the same way DeepSpeed itself hands back ``l_aux``).

Legend: S tokens in the pool (image patches, then text positions), D model width, E experts.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# DeepSpeed's logger writes to stdout from the moment it is imported (its accelerator warning);
# importing it with stdout redirected points that handler at stderr for good, so the project's own
# stdout (JSON from tools, the training summary) stays clean.
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer

from limoe_ds.config.model import MoEConfig
from limoe_ds.moe.routing import Routing, expert_capacity, route_top1
from limoe_ds.parallel.tp_plan import TensorParallel


class MLP(nn.Module):
    """Transformer FFN; also the expert module (one expert = one MLP of the dense twin's size).
    With tensor parallelism (dense blocks only) fc1 is column- and fc2 row-parallel."""

    def __init__(self, width: int, mlp_dim: int, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.fc1 = tp.column(width, mlp_dim)
        self.fc2 = tp.row(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LIMoEGate(nn.Module):
    """DeepSpeed 0.19.8 gate interface around ``route_top1``.

    forward(input_SD, token_type_S, sparse_routes, use_tutel) returns DeepSpeed's sparse 7-tuple
    (l_aux, capacity, num_experts, indices_1S (-1 = dropped), locations_1S, gates_1S, exp_counts_E).
    """

    def __init__(self, width: int, cfg: MoEConfig, *, tp_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.wg = nn.Linear(width, cfg.num_experts, bias=False)
        # DeepSpeed splits the capacity dimension across TP ranks, so C must divide by tp.
        self.capacity_multiple_of = math.lcm(cfg.capacity_multiple_of, tp_size)
        self.ep_group: dist.ProcessGroup | None = None
        self.last_routing: Routing | None = None

    def _set_ep_group(self, ep_group: dist.ProcessGroup) -> None:
        self.ep_group = ep_group

    def capacity(self, num_slots: int) -> int | None:
        """Static capacity from the pool's slot count (padding included), None = dropless.

        Counting padding slots keeps C identical on every expert-parallel rank for equal
        micro-batches, which the all-to-all needs, without communication.
        """
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(num_slots, self.cfg.num_experts, cf, multiple_of=self.capacity_multiple_of)

    def forward(self, input_SD: torch.Tensor, token_type_S: torch.Tensor, sparse_routes: bool = True,
                use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise ValueError("LIMoEGate supports DeepSpeed's sparse dispatch only (use_tutel=False)")
        E = self.cfg.num_experts
        logits_SE = F.linear(input_SD.float(), self.wg.weight.float())  # router math in fp32
        noise_SE = None
        if self.training and self.cfg.noise_std > 0:
            noise_SE = torch.randn_like(logits_SE) * (self.cfg.noise_std / E)  # V-MoE: N(0, (sigma/E)^2)
        routing = route_top1(logits_SE, token_type_S, self.cfg, capacity=self.capacity(input_SD.shape[0]),
                             noise_NE=noise_SE)
        capacity = self._agree_on_capacity(routing.capacity)
        routing.capacity = capacity
        self.last_routing = routing
        kept_S = routing.kept_N
        indices_1S = torch.where(kept_S, routing.expert_N, -1).to(torch.int32)[None]
        locations_1S = torch.where(kept_S, routing.position_N, 0).to(torch.int32)[None]
        l_aux = sum(routing.aux.values(), logits_SE.new_zeros(()))
        exp_counts_E = torch.zeros(E, dtype=torch.int64, device=kept_S.device).scatter_add_(
            0, routing.expert_N.clamp(min=0), kept_S.long())
        return l_aux, capacity, E, indices_1S, locations_1S, routing.combine_N[None], exp_counts_E

    def _agree_on_capacity(self, capacity: int) -> int:
        """Every rank of the expert-parallel group must use the same C for the all-to-all.

        In training C comes from the static slot count (equal micro-batches), so no
        communication. In evaluation batches can differ (the last one) and dropless C is the
        largest load: take the MAX over the group.
        """
        m = self.capacity_multiple_of
        capacity = -(-capacity // m) * m
        if not self.training and self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            c = torch.tensor([capacity], dtype=torch.int64, device=self.wg.weight.device)
            dist.all_reduce(c, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = int(c.item())
        return capacity


class LIMoELayer(MoE):
    """A DeepSpeed ``MoE`` whose gate is ``LIMoEGate``; the engine recognises it as an MoE layer."""

    def __init__(self, width: int, mlp_dim: int, cfg: MoEConfig, *, ep_size: int = 1, tp_size: int = 1) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build a stock TopKGate; set its fields here
        if cfg.num_experts % ep_size:
            raise ValueError(f"moe.num_experts={cfg.num_experts} is not divisible by the expert-parallel "
                             f"size {ep_size}; choose an ep size that divides it")
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = cfg.num_experts
        self.num_local_experts = cfg.num_experts // ep_size
        experts = Experts(MLP(width, mlp_dim), self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(LIMoEGate(width, cfg, tp_size=tp_size), experts, self.expert_group_name,
                                      ep_size, self.num_local_experts)

    @property
    def gate(self) -> LIMoEGate:
        return self.deepspeed_moe.gate

    def forward(self, x_SD: torch.Tensor, token_type_S: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Route the pool; dropped and padding tokens get exactly 0 (they pass on the residual)."""
        y_SD = self.deepspeed_moe(x_SD, token_type_S)
        routing, self.gate.last_routing = self.gate.last_routing, None
        return y_SD, routing
