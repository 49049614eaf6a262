"""Where training runs: device and precision, the torchrun process group, and FSDP2 sharding
(a sharded copy of the model, and its full state gathered for checkpoints and scattered back)."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..device import resolve_device
from ..errors import ConfigError
from ..model import Block
from .settings import LoopConfig


@dataclass
class TrainRuntime:
    """Where this process trains: device, rank among torchrun's processes, sharding and precision."""

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False  # train a sharded copy (FSDP2) instead of a DDP-wrapped model
    bf16: bool = False  # bf16 compute (autocast; FSDP also gathers its parameters in bf16)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(config: LoopConfig) -> TrainRuntime:
    """Pick device and precision; join the torchrun process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_available():
        raise ConfigError(f"launched as {world} processes, but this torch build has no torch.distributed")
    # One process has nothing to shard: --parallel fsdp then trains the plain model, so a
    # settings file written for several GPUs also runs (and resumes) on one.
    fsdp = config.parallel == "fsdp" and world > 1
    if fsdp:
        _fsdp2()  # refuse before joining the process group when this torch has no FSDP2
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    use_bf16 = (config.dtype == "bfloat16") or (
        config.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16 and device.type != "cuda":
        raise ConfigError(
            "bfloat16 on CPU is hundreds of times slower than float32 on CPUs without bf16 units; "
            "use --dtype float32 (the default on CPU)"
        )

    def autocast():
        if use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return TrainRuntime(device, autocast, rank, world, local_rank, fsdp=fsdp, bf16=use_bf16)


def cleanup_distributed() -> None:
    """Leave the process group, when this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fsdp2():
    """fully_shard and MixedPrecisionPolicy, from where this torch keeps them."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:  # torch 2.4 and 2.5 kept FSDP2 under _composable
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise ConfigError(f"--parallel fsdp needs FSDP2 (fully_shard, torch >= 2.4); this is torch "
                              f"{torch.__version__}: use --parallel ddp") from None
    return fully_shard, MixedPrecisionPolicy


def shard_model(model: nn.Module, rt: TrainRuntime) -> nn.Module:
    """A copy of model sharded with FSDP2 over all processes: each transformer Block is its own
    unit (gathered just before it runs, freed after), then the root takes the rest.

    The copy leaves `model` a plain module, so a stage's references to it (and its save after
    run_loop) see ordinary tensors. Every process must call this.
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = _fsdp2()
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    # bf16: FSDP gathers the parameters in bf16 (half the traffic of fp32), while the sharded
    # master weights and the optimizer state stay fp32. Gradients are reduced in fp32 so that
    # summing over many ranks does not round away small updates. Autocast stays on: it costs
    # nothing on bf16 weights, keeps LayerNorm and softmax in fp32, and still covers modules a
    # loss runs outside the shards (a distillation teacher).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if rt.bf16 \
        else MixedPrecisionPolicy()
    # Blocks also return their (k, v) cache: views, which FSDP warns about in case they are
    # modified in place. Nothing does: the loop never uses the cache.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if rt.world_size > 1:
        # DDP copies rank 0's weights to every process when it wraps a model; FSDP does not.
        # Do it here, or weights a stage drew at random on each process without a shared seed
        # (LoRA adapters) would be trained as a patchwork of every process's shard.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                on_device = tensor.detach().to(rt.device)
                torch.distributed.broadcast(on_device, src=0)
                tensor.copy_(on_device)
    sharded = copy.deepcopy(model)
    for module in list(sharded.modules()):
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    # The root last: it holds every parameter no block holds (embeddings, final LayerNorm, the
    # head), so the tied wte / lm_head weight sits in one unit and stays one parameter. The root
    # is needed again first thing in backward, so it is kept gathered between the two.
    fully_shard(sharded, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return sharded


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's order: what the integer keys
    of optimizer.state_dict() stand for."""
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights under their first name
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by(state: dict, keys: list, new_keys: list) -> dict:
    """An optimizer state dict with its parameter keys renamed (indices <-> names)."""
    new = dict(zip(keys, new_keys))
    return {"state": {new[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [new[k] for k in g["params"]]} for g in state["param_groups"]]}


def gather_full_state(sharded: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full (unsharded) weights and optimizer state on the CPU of the main process, as a plain
    model and optimizer.state_dict() would give them; empty on the other processes. Every
    process must call this (it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the main process only
    weights = get_model_state_dict(sharded, options=options)
    if optimizer is None:
        return weights, None
    by_name = get_optimizer_state_dict(sharded, optimizer, options=options)
    if not by_name:
        return weights, None
    names = _param_names(sharded, optimizer)
    return weights, _keyed_by(by_name, names, list(range(len(names))))


def scatter_full_state(sharded: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load full weights and a plain optimizer.state_dict() into a sharded model and its
    optimizer. Every process passes the full tensors (each read the checkpoint) and keeps its
    own shard of them, so nothing is sent between processes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(sharded, weights, options=options)
    names = _param_names(sharded, optimizer)
    set_optimizer_state_dict(sharded, optimizer, _keyed_by(optim_state, list(range(len(names))), names),
                             options=options)
