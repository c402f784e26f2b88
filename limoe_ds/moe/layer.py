"""The LIMoE MoE feed-forward layer on DeepSpeed-MoE.

We keep DeepSpeed's ``MoE`` wrapper (so the engine finds the layer, builds expert-parallel groups
and splits expert parameters for ZeRO), its ``Experts`` container and its ``MOELayer`` sparse
dispatch and all-to-all, and replace only the gate. ``LIMoELayer.forward`` routes the pool first
(the pure ``limoe_ds.moe.routing.route_top1``, with the capacity decided in ONE place,
``LIMoELayer.capacity``), then hands the decision to DeepSpeed's ``MOELayer`` through the argument
DeepSpeed passes to its gate untouched (``used_token``); ``LIMoEGate`` only turns it into
DeepSpeed's dispatch tuple. The routing and its statistics come back by return value:
``y, routing, stats = layer(x, token_types)``.

Legend: S tokens in the pool (image patches, then text positions), D model width, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from limoe_ds.compat import deepspeed as compat
from limoe_ds.config.model import MoEConfig
from limoe_ds.moe.routing import TOKEN_IMAGE, Routing, expert_capacity, route_top1
from limoe_ds.moe.stats import RoutingStats
from limoe_ds.parallel.collectives import max_over_ranks

compat.deepspeed()  # quietly imported, version-checked
with compat.quiet_import():
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer


class MLP(nn.Module):
    """Transformer FFN; also the expert module (one expert = one MLP of the dense twin's size)."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Configured:
    def __repr__(self) -> str:
        return "CONFIGURED"


CONFIGURED = _Configured()
"""Route at the configured capacity factor: ``moe.capacity_factor`` in training mode,
``moe.eval_capacity_factor`` in eval mode (None there = dropless)."""


class LIMoEGate(nn.Module):
    """The router weights, and DeepSpeed 0.19.8's gate interface for a routing decided beforehand.

    forward(input_SD, (routing, capacity), sparse_routes, use_tutel) returns DeepSpeed's sparse
    7-tuple (l_aux, capacity, num_experts, indices_1S (-1 = dropped), locations_1S, gates_1S,
    exp_counts_E). l_aux (which DeepSpeed keeps as ``MOELayer.l_aux``) is the sum of the weighted
    auxiliary losses; ours travel with the routing (``Routing.aux``) and are summed in the step.
    """

    def __init__(self, width: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wg = nn.Linear(width, cfg.num_experts, bias=False)
        self.ep_group: dist.ProcessGroup | None = None

    def _set_ep_group(self, ep_group: dist.ProcessGroup) -> None:
        self.ep_group = ep_group

    def forward(self, input_SD: torch.Tensor, decided: tuple[Routing, int], sparse_routes: bool = True,
                use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise ValueError("LIMoEGate supports DeepSpeed's sparse dispatch only (use_tutel=False)")
        routing, capacity = decided
        E = self.cfg.num_experts
        kept_S = routing.kept_N
        indices_1S = torch.where(kept_S, routing.expert_N, -1).to(torch.int32)[None]
        locations_1S = torch.where(kept_S, routing.position_N, 0).to(torch.int32)[None]
        exp_counts_E = torch.zeros(E, dtype=torch.int64, device=kept_S.device).scatter_add_(
            0, routing.expert_N.clamp(min=0), kept_S.long())
        l_aux = sum(routing.aux.values(), routing.combine_N.new_zeros(()))
        return l_aux, capacity, E, indices_1S, locations_1S, routing.combine_N[None], exp_counts_E


class ModalityPools(nn.Module):
    """VL-MoE's MoE layer (``moe.modality_experts``): an image pool and a text pool, each a
    ``LIMoELayer`` with its own router, ``num_experts`` image and ``text_experts`` text experts
    (``MoEConfig.pool``; both pools sharded over the expert-parallel group; DeepSpeed sees two MoE
    layers, image first). The block routes its image patches
    through ``image`` and its text positions through ``text``; each returns its own routing."""

    def __init__(self, width: int, mlp_dim: int, cfg: MoEConfig, *, ep_size: int = 1, index: int = 0) -> None:
        super().__init__()
        self.image = LIMoELayer(width, mlp_dim, cfg.pool("image"), ep_size=ep_size, index=index, pool="image")
        self.text = LIMoELayer(width, mlp_dim, cfg.pool("text"), ep_size=ep_size, index=index, pool="text")

    def pools(self) -> list["LIMoELayer"]:
        return [self.image, self.text]


class LIMoELayer(MoE):
    """A DeepSpeed ``MoE`` whose gate is ``LIMoEGate``; the engine recognises it as an MoE layer.

    ``index`` is the block index (it names the layer's statistics). Capacities are rounded up to a
    multiple of ``capacity_multiple_of`` (``moe.capacity_multiple_of``; the tensor-parallel plan
    raises it to a multiple of tp, since DeepSpeed splits the capacity dimension across tp ranks)."""

    def __init__(self, width: int, mlp_dim: int, cfg: MoEConfig, *, ep_size: int = 1, index: int = 0,
                 pool: str = "") -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build a stock TopKGate (compat.init_moe_fields)
        if cfg.num_experts % ep_size:
            key = "text_experts" if pool == "text" else "num_experts"  # (the text pool's: MoEConfig.pool)
            raise ValueError(f"moe.{key}={cfg.num_experts} is not divisible by the expert-parallel "
                             f"size {ep_size}; choose an ep size that divides it")
        self.cfg, self.index = cfg, index
        self.pool = pool
        """'' (the layer's one pool), or 'image' / 'text': one of VL-MoE's per-modality pools."""
        self.capacity_multiple_of = cfg.capacity_multiple_of
        self.frozen_dropless = False
        """A locked tower's layer (``train.image_tower.dropless``): routes as in evaluation, dropless
        and without router noise, in training mode too."""
        compat.init_moe_fields(self, ep_size=ep_size, num_experts=cfg.num_experts)
        experts = Experts(MLP(width, mlp_dim), self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(LIMoEGate(width, cfg), experts, self.expert_group_name,
                                      ep_size, self.num_local_experts)

    @property
    def gate(self) -> LIMoEGate:
        return self.deepspeed_moe.gate

    @property
    def routes_training(self) -> bool:
        """Training-mode routing (router noise, the training capacity); not in a frozen dropless layer."""
        return self.training and not self.frozen_dropless

    def capacity_factor(self, capacity_factor=CONFIGURED) -> float | None:
        if self.frozen_dropless and self.training:
            return None
        if capacity_factor is CONFIGURED:
            return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return capacity_factor

    def static_capacity(self, num_slots: int, capacity_factor: float | None, image_slots: int | None = None
                        ) -> int | tuple[int, int] | None:
        """Slots per expert from the pool's slot count (padding included), None = dropless; with
        ``moe.modality_capacity`` the (image, text) budgets from each modality's slots
        (``image_slots`` of the pool are image patches, the rest text positions; 0 for a modality
        the pool does not hold).

        Counting padding slots keeps C identical on every expert-parallel rank for equal
        micro-batches, which the all-to-all needs, without communication.
        """
        if capacity_factor is None:
            return None
        E, m = self.cfg.num_experts, self.capacity_multiple_of
        if not self.cfg.modality_capacity:
            return expert_capacity(num_slots, E, capacity_factor, multiple_of=m)
        return tuple(expert_capacity(n, E, capacity_factor, multiple_of=m) if n else 0
                     for n in (image_slots, num_slots - image_slots))

    def capacity(self, static: int | tuple[int, int] | None, routing: Routing) -> int:
        """THE capacity of this pass: the static one, or dropless the largest expert load, rounded up
        to the multiple DeepSpeed's tensor-parallel split needs.

        Every rank of the expert-parallel group must use the same C for the all-to-all. In training
        C comes from the static slot count (equal micro-batches), so no communication. In evaluation
        batches can differ (the last one; a frozen dropless layer's loads too) and dropless C is the
        largest load: take the MAX over the group.
        """
        m = self.capacity_multiple_of
        if isinstance(static, tuple):  # modality budgets, each a multiple of m: the buffer holds both
            static = sum(static)
        capacity = -(-(routing.max_load() if static is None else static) // m) * m
        if not self.routes_training and self.gate.ep_group is not None:
            capacity = max_over_ranks(capacity, self.gate.ep_group)
        return capacity

    def route(self, x_SD: torch.Tensor, token_type_S: torch.Tensor, capacity_factor=CONFIGURED,
              image_slots: int | None = None) -> tuple[Routing, int]:
        """The routing of the pool (router math in float32; V-MoE's noise N(0, (sigma/E)^2) in
        training) and the capacity its dispatch uses. ``image_slots``: how many of the pool's
        slots are image patches (the block knows; counted from the token types if not given)."""
        E = self.cfg.num_experts
        logits_SE = F.linear(x_SD.float(), self.gate.wg.weight.float())
        noise_SE = None
        if self.routes_training and self.cfg.noise_std > 0:
            noise_SE = torch.randn_like(logits_SE) * (self.cfg.noise_std / E)
        if self.cfg.modality_capacity and image_slots is None:
            image_slots = int((token_type_S == TOKEN_IMAGE).sum())
        static = self.static_capacity(x_SD.shape[0], self.capacity_factor(capacity_factor), image_slots)
        routing = route_top1(logits_SE, token_type_S, self.cfg, capacity=static, noise_NE=noise_SE)
        return routing, self.capacity(static, routing)

    def forward(self, x_SD: torch.Tensor, token_type_S: torch.Tensor, capacity_factor=CONFIGURED,
                image_slots: int | None = None) -> tuple[torch.Tensor, Routing, RoutingStats]:
        """Route the pool; dropped and padding tokens get exactly 0 (they pass on the residual)."""
        routing, capacity = self.route(x_SD, token_type_S, capacity_factor, image_slots)
        y_SD = self.deepspeed_moe(x_SD, (routing, capacity))
        return y_SD, routing, RoutingStats.of(self.index, routing, capacity, self.pool)
