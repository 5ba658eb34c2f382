"""FSDP2: a model sharded over every rank, built without ever holding it whole on one.

Owns: the device mesh (one dimension, every rank), which modules become FSDP units
(`trainer.fsdp.wrap`, or by size), the mixed-precision policies, building on the meta device and
materialising shard by shard, and the model's and optimizer's sharded state as `Stateful` parts
(through `torch.distributed.checkpoint.state_dict`). Which strategy a run uses, and what the loop
asks of it, is harness/strategy.py; writing the shards is harness/checkpoint's.

Units: each module named in `trainer.fsdp.wrap` (by class name, or module.path.Class) is sharded on
its own, children before parents, then the root takes the rest. With `wrap: []`, FSDP1's size
policy: walking from the leaves, a module whose parameters not yet in a unit reach
`trainer.fsdp.min_params` becomes one. A unit's parameters are all-gathered for its forward and
backward only, so peak memory is the shards plus the largest unit gathered.

bf16 (`trainer.amp=bf16`): units compute with bf16 parameters and reduce gradients in fp32; every
normalization layer is a unit of its own with fp32 parameters, because BatchNorm's fp32 running
statistics refuse bf16 weights ("expected scalar type BFloat16 but found Float") and norms are
where bf16 loses most. Autocast stays on around the forward, so a bf16 convolution can follow an
fp32 norm.

Building: the model is constructed on the meta device (no memory), sharded, given empty storage
(`to_empty`), then initialised module by module in registration order with each module's own
`reset_parameters()`, from the random state construction began with: every rank draws the module's
full tensors on the CPU (the same numbers DDP's construction draws) and keeps only its shard. So
the weights equal DDP's with the same seed, and building holds the shards plus one module whole.
A module with parameters or buffers of its own but no `reset_parameters()` cannot be initialised
that way: refused before anything is built, naming it. Initialisation the constructor does beyond
its modules' reset_parameters() (`nn.init.zeros_(self.head.weight)` in `__init__`) would be lost
on the meta device: the in-place operations of construction and of the replay are recorded and
compared, and a model whose two records differ is refused, naming the first difference.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.overrides import TorchFunctionMode

from harness import dist as hdist
from harness.config import ConfigError, FsdpConfig

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def mesh(device: torch.device) -> DeviceMesh:
    """Every rank on one dimension; a one-rank group of its own at world size 1."""
    hdist.ensure_group(device)
    return init_device_mesh(device.type, (hdist.world_size(),))


def _class_names(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def plan_units(model: nn.Module, wrap: list[str], min_params: int) -> list[nn.Module]:
    """The modules sharded as units of their own, children before parents (never the root)."""
    if wrap:
        units = [m for m in model.modules() if m is not model and set(_class_names(m)) & set(wrap)]
        found = {name for m in units for name in _class_names(m)}
        unknown = [name for name in wrap if name not in found]
        if unknown:
            present = sorted({type(m).__name__ for m in model.modules() if m is not model})
            raise ConfigError(f"trainer.fsdp.wrap={wrap}: no module of class {', '.join(unknown)} in "
                              f"{type(model).__name__}; its classes: {', '.join(present)}")
        return list(reversed(units))  # modules() is parents first
    units = []

    def visit(module: nn.Module) -> int:
        """Parameters under `module` that no unit below it holds; makes `module` a unit at min_params."""
        pending = sum(p.numel() for p in module.parameters(recurse=False))
        pending += sum(visit(child) for child in module.children())
        if module is not model and pending >= min_params:
            units.append(module)
            return 0
        return pending

    visit(model)
    return units


def shard(model: nn.Module, *, device: torch.device, cfg: FsdpConfig, bf16: bool) -> nn.Module:
    """`fully_shard` the units, then the root, in place; returns the model (now an FSDPModule)."""
    devices = mesh(device)
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    kwargs: dict[str, Any] = {"mesh": devices, "reshard_after_forward": cfg.reshard_after_forward}
    norms = [m for m in model.modules() if isinstance(m, NORMS) and any(True for _ in m.parameters(recurse=False))] \
        if bf16 else []
    for norm in norms:
        fully_shard(norm, **kwargs, mp_policy=MixedPrecisionPolicy())
    for unit in plan_units(model, cfg.wrap, cfg.min_params):
        if not isinstance(unit, FSDPModule):
            fully_shard(unit, **kwargs, mp_policy=compute)
    fully_shard(model, **kwargs, mp_policy=compute)
    return model


def _own_tensors(module: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    buffers = {n: b for n, b in module.named_buffers(recurse=False)}
    return params, buffers


def check_initialisable(model: nn.Module) -> None:
    """Every module holding tensors of its own can re-initialise them: refuse before building."""
    for name, module in model.named_modules():
        params, buffers = _own_tensors(module)
        if (params or buffers) and not callable(getattr(module, "reset_parameters", None)):
            what = ", ".join([*params, *buffers])
            raise ConfigError(f"trainer.strategy=fsdp builds the model on the meta device and initialises each "
                              f"module with its reset_parameters(); {name or 'the root'} "
                              f"({type(module).__name__}) holds {what} but has no reset_parameters(): give it "
                              f"one that does what its __init__ does, or use trainer.strategy=ddp")


class InPlaceOps(TorchFunctionMode):
    """Records the names of the in-place tensor operations run under it: what initialises tensors
    (nn.init's uniform_, kaiming_uniform_, zeros_ ..., a buffer's fill_), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def check_replayed(name: str, constructed: list[str], replayed: list[str]) -> None:
    """Construction initialised nothing that the reset_parameters() replay did not, in the same order."""
    if constructed == replayed:
        return
    k = next((i for i, (a, b) in enumerate(zip(constructed, replayed, strict=False)) if a != b),
             min(len(constructed), len(replayed)))
    ran = constructed[k] if k < len(constructed) else "nothing more"
    replay = replayed[k] if k < len(replayed) else "nothing more"
    raise ConfigError(f"trainer.strategy=fsdp: constructing {name} initialises tensors in ways its "
                      f"modules' reset_parameters() do not ({len(constructed)} in-place operations against "
                      f"{len(replayed)}; operation {k + 1} is {ran} in the constructor and {replay} in the "
                      f"replay). On the meta device that initialisation is lost and the weights would not be the "
                      f"ones ddp builds: move it into reset_parameters() of the module that owns the tensors, or "
                      f"use trainer.strategy=ddp")


def _shard_of(full: torch.Tensor, p: DTensor) -> torch.Tensor:
    """This rank's piece of `full` as `p` holds it: FSDP's dim-0 chunk, cut directly (no copy)."""
    mesh = p.device_mesh
    if p.placements == (Shard(0),) and mesh.ndim == 1:
        chunks = torch.chunk(full, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        piece = chunks[rank] if rank < len(chunks) else full[:0]
        if piece.shape == p.to_local().shape:
            return piece
    return distribute_tensor(full.to(p.device), mesh, p.placements, src_data_rank=None).to_local()


@torch.no_grad()
def initialise(model: nn.Module, record: InPlaceOps | None = None) -> None:
    """Draw every module's full tensors on the CPU with its reset_parameters(), keep this rank's shard.
    `record` sees the in-place operations reset_parameters() runs."""
    for module in model.modules():
        params, buffers = _own_tensors(module)
        if not params and not buffers:
            continue
        for n, p in params.items():
            module._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for n, b in buffers.items():
            module._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
        with record if record is not None else nullcontext():
            module.reset_parameters()  # type: ignore[operator]
        for n, p in params.items():
            full = module._parameters[n]
            module._parameters[n] = p
            assert full is not None
            if isinstance(p, DTensor):
                p.to_local().copy_(_shard_of(full, p))
            else:
                p.copy_(full)
        for n, b in buffers.items():
            full_buffer = module._buffers[n]
            module._buffers[n] = b
            assert full_buffer is not None
            b.copy_(full_buffer)


def build(make: Callable[[], nn.Module], *, device: torch.device, cfg: FsdpConfig, bf16: bool) -> nn.Module:
    """Construct on the meta device, shard, materialise on `device`, initialise as construction would have."""
    start = torch.get_rng_state()  # where a construction on a real device would begin drawing
    constructed, replayed = InPlaceOps(), InPlaceOps()
    with torch.device("meta"), constructed:
        model = make()
    check_initialisable(model)
    name = type(model).__name__  # before fully_shard makes it FSDP<name>
    shard(model, device=device, cfg=cfg, bf16=bf16)
    model.to_empty(device=device)
    torch.set_rng_state(start)
    initialise(model, replayed)  # the same draws as construction: the generator ends where DDP's leaves it
    check_replayed(name, constructed.ops, replayed.ops)
    return model


class ShardedModel:
    """The model part of a checkpoint: this rank's shards (DTensors) and the replicated buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class ShardedOptimizer:
    """The optimizer part: its state per parameter name, sharded as the parameters are."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
