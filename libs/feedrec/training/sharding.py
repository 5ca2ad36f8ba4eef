"""Sharding plans per device type, DMP wrapping and gathering a sharded model back in one piece."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import ShardingPlan
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

#: Sharding types the stock planner may choose, per device type. On CPU/gloo TorchRec has no
#: reduce-scatter path for row-wise sharding, so the planner is limited to what works there.
SHARDING_TYPES: dict[str, tuple[str, ...]] = {
    "cpu": (
        ShardingType.TABLE_WISE.value,
        ShardingType.COLUMN_WISE.value,
        ShardingType.DATA_PARALLEL.value,
    ),
    "cuda": (
        ShardingType.TABLE_WISE.value,
        ShardingType.ROW_WISE.value,
        ShardingType.COLUMN_WISE.value,
        ShardingType.TABLE_ROW_WISE.value,
        ShardingType.DATA_PARALLEL.value,
    ),
}


def embedding_tables(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """The model's ``EmbeddingBagCollection`` modules by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


def plan_sharding(
    model: nn.Module,
    device: torch.device,
    sharders: list[EmbeddingBagCollectionSharder],
    *,
    overrides: dict[str, str] | None = None,
) -> ShardingPlan:
    """Run the planner on every rank (collectively) with the device's allowed sharding types.

    Args:
        overrides: table name -> sharding type, to force a choice (e.g. ``{"ranker_post":
            "column_wise"}``).
    """
    allowed = SHARDING_TYPES[device.type]
    constraints = {}
    for ebc in embedding_tables(model).values():
        for table in ebc.embedding_bag_configs():
            types = [overrides[table.name]] if overrides and table.name in overrides else allowed
            constraints[table.name] = ParameterConstraints(sharding_types=list(types))
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def describe_plan(plan: ShardingPlan) -> list[dict[str, object]]:
    """Table -> sharding type -> ranks, for logs and the artifact."""
    rows = []
    for module, params in plan.plan.items():
        for table, ps in params.items():
            ranks = sorted({r for r in (ps.ranks or [])})
            rows.append(
                {"module": module, "table": table, "sharding": ps.sharding_type, "ranks": ranks}
            )
    return rows


def shard(
    model: nn.Module,
    device: torch.device,
    *,
    sparse_lr: float,
    overrides: dict[str, str] | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Fuse a row-wise Adagrad into the embedding backward, plan, and wrap in DMP.

    The model's tables should be on the ``meta`` device: DMP allocates only the local shards.
    """
    for ebc in embedding_tables(model).values():
        apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": sparse_lr})
    sharders = [EmbeddingBagCollectionSharder()]
    plan = plan_sharding(model, device, sharders, overrides=overrides)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def gather_state_dict(model: DistributedModelParallel) -> dict[str, torch.Tensor] | None:
    """Collective: every rank calls it; rank 0 gets the full, unsharded state dict (CPU tensors).

    Keys are those of the unsharded module, so ``Ranker(...).load_state_dict`` takes it as is.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    full: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out
        else:
            full[key] = value.detach().cpu().clone()
    return full if rank == 0 else None
