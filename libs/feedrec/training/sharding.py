"""Sharding plans per device type, DMP wrapping and gathering a sharded model back in one piece."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import ShardingPlan
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
)
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


#: Sharding types the stock planner refuses on a device type but that work from an explicit
#: per-table plan (measured: row-wise on CPU/gloo).
EXPLICIT_SHARDING: dict[str, dict[str, Callable[[], ParameterShardingGenerator]]] = {
    "cpu": {ShardingType.ROW_WISE.value: lambda: row_wise(compute_kernel="fused")},
    "cuda": {},
}


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
            "column_wise"}``). A type the planner refuses on this device but that works there
            (``EXPLICIT_SHARDING``, e.g. row-wise on CPU) is placed by an explicit plan instead.
    """
    overrides = dict(overrides or {})
    allowed = SHARDING_TYPES[device.type]
    explicit_types = EXPLICIT_SHARDING[device.type]
    tables = {
        t.name for ebc in embedding_tables(model).values() for t in ebc.embedding_bag_configs()
    }
    for table, kind in overrides.items():
        if table not in tables:
            raise ValueError(
                f"sharding override: unknown table {table!r} (tables: {sorted(tables)})"
            )
        if kind not in allowed and kind not in explicit_types:
            raise ValueError(
                f"sharding override {table}={kind}: not available on {device.type} "
                f"(choose from {sorted({*allowed, *explicit_types})})"
            )
    constraints = {}
    for table in tables:
        types = [overrides[table]] if overrides.get(table) in allowed else allowed
        constraints[table] = ParameterConstraints(sharding_types=list(types))
    world = dist.get_world_size()
    topology = Topology(world_size=world, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    for path, ebc in embedding_tables(model).items():
        forced = {
            t.name: explicit_types[overrides[t.name]]()
            for t in ebc.embedding_bag_configs()
            if overrides.get(t.name) in explicit_types
        }
        if forced:
            # The helper wants a generator for every table; only the forced ones are kept.
            every = {
                t.name: forced.get(t.name, data_parallel()) for t in ebc.embedding_bag_configs()
            }
            module_plan = construct_module_sharding_plan(
                ebc,
                per_param_sharding=every,
                sharder=sharders[0],
                local_size=world,
                world_size=world,
                device_type=device.type,
            )
            plan.plan[path].update({name: module_plan[name] for name in forced})
    return plan


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
