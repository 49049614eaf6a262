"""The training loop, shared by every stage that trains (pretraining, finetuning, distillation).

`run_loop` owns what every stage needs the same way: AdamW with weight-decay groups, warmup +
cosine learning rate, gradient accumulation and clipping, bf16 autocast and optional
torch.compile on CUDA (fp32 on CPU), DDP or FSDP2 sharding under torchrun, periodic
validation, a progress bar, a JSONL metrics log, and checkpoints that hold model, optimizer,
schedule position, RNG and data-sampler state so that a resumed run continues exactly (with
any number of processes, sharded or not). A stage plugs in its own batches (`BatchSource`)
and loss (`LossFn`).

`pretrain` is the pretraining stage built on it: data -> tokenizer -> GPT -> artifact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from .config import StageConfig, option
from .device import DEVICE_HELP, resolve_device
from .progress import progress_bar, progress_wanted
from .data import TokenShards
from .errors import ConfigError
from .model import Block, GPTConfig

CHECKPOINT = "checkpoint"

# ---------------------------------------------------------------------------------------
# Settings


@dataclass
class LoopConfig(StageConfig):
    """Optimizer, schedule and bookkeeping settings every training stage shares."""

    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-step per process")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "final learning rate (floor of the cosine decay)")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and embeddings, not biases or LayerNorm)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max gradient norm (0: off)")
    eval_interval: int = option(200, "steps between validations (and at the end)")
    checkpoint_interval: int = option(200, "steps between checkpoints (and at the end)")
    log_interval: int = option(10, "steps between log lines")
    seed: int = option(1337, "random seed (weights and batches)")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option(
        "auto", "how torchrun's processes share the model: ddp (a full copy on each), fsdp (parameters, gradients "
        "and optimizer state sharded: for models whose training does not fit one GPU), auto (ddp). With one "
        "process, every choice trains unsharded",
        saved=False)  # where a stage runs, not what it writes: checkpoints resume across it

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"learning rate settings are inconsistent: lr={self.lr}, min_lr={self.min_lr}, "
                f"warmup_steps={self.warmup_steps}; need 0 <= min_lr <= lr, lr > 0, warmup_steps >= 0"
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")


# ---------------------------------------------------------------------------------------
# Pure pieces


def lr_at(step: int, config: LoopConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; leave biases and LayerNorm gains alone. Frozen
    parameters are left out."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}  # tied weights once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lm_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; returns the mean loss and the number of target tokens.
    The model computes it from its last hidden states chunk by chunk (GPT.forward's
    `targets`), so the (B, T, V) float logits are never held in memory."""
    x, y = batch
    return model(x, targets=y), y.numel()


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per parameter plus attention's
    12 * layers * width * sequence (the PaLM appendix estimate)."""
    n = config.n_layer * (4 * config.n_embd**2 + 2 * config.n_embd * config.n_inner)  # blocks
    n += config.vocab_size * config.n_embd  # the LM head matmul
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


# Dense bf16 tensor-core peaks, for model FLOPs utilization on known GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)


# ---------------------------------------------------------------------------------------
# Runtime setup


@dataclass
class TrainRuntime:
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


class BatchSource(Protocol):
    """Anything that draws a training batch (a tuple of tensors) with a torch.Generator."""

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]: ...


LossFn = Callable[[nn.Module, tuple], tuple[torch.Tensor, int]]


@dataclass
class WindowBatches:
    """Random (x, y) windows of a token split."""

    shards: TokenShards
    batch_size: int
    block_size: int

    def next_batch(self, generator: torch.Generator):
        return self.shards.sample(self.batch_size, self.block_size, generator)


# ---------------------------------------------------------------------------------------
# Sharding (FSDP2)


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


# ---------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds, validation excluded
    history: list = field(default_factory=list)  # validation results so far


def save_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator,
                    state: LoopState, fingerprint: dict, settings: dict) -> None:
    """Write model (safetensors) and trainer state (tensors and plain values, loadable with
    weights_only=True), then swap the folder in whole so a crash never leaves half of one.

    optimizer: the optimizer, or its full state dict already gathered from FSDP shards
    (gather_full_state): the files are the same either way, so any run can resume them."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_model(model, str(tmp / "model.safetensors"))
    trainer = {
        "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "state": asdict(state),
    }
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    # The stage's settings beside the checkpoint let `--resume` continue from files alone.
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_fingerprint(folder: Path) -> dict | None:
    path = folder / "fingerprint.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator,
                    sharded: nn.Module | None = None) -> LoopState:
    """Restore a checkpoint into model, optimizer and generator; with FSDP (`sharded`, the copy
    the optimizer trains) the full weights and optimizer state are then split into its shards."""
    load_safetensors_model(model, str(folder / "model.safetensors"))
    trainer = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
    if sharded is None:
        optimizer.load_state_dict(trainer["optimizer"])
    else:
        scatter_full_state(sharded, optimizer, model.state_dict(), trainer["optimizer"])
    generator.set_state(trainer["generator"])
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return LoopState(**trainer["state"])


def check_resume(folder: Path, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint made with other settings: name each difference."""
    saved = read_checkpoint_fingerprint(folder)
    if saved is None:
        raise ConfigError(f"{folder} has no fingerprint.json; it is not a CompactGPT checkpoint")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"cannot resume {folder}: it was made with different settings ({'; '.join(diffs)}). "
            "Resume with the original settings, or start over in another --out folder (or pass --overwrite)"
        )


# ---------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopResult:
    model: nn.Module
    state: LoopState
    metrics: dict


@dataclass
class _Trainer:
    """What one run of the loop holds: the model as trained (compiled / DDP-wrapped, or a
    sharded FSDP copy of the plain model), the optimizer, the batch sampler's generator and
    the state a checkpoint saves."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    state: LoopState
    rt: TrainRuntime
    ckpt_dir: Path
    fingerprint: dict
    settings: dict
    sharded: nn.Module | None = None  # FSDP: the sharded copy the optimizer trains

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates (under FSDP, the shards)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def pull_weights(self, with_optimizer: bool = False) -> dict | None:
        """FSDP: copy the trained weights from the shards into the plain model on the main
        process; with_optimizer, also return the full optimizer state there. Every process
        must call it. Without FSDP it does nothing: the plain model is the one trained."""
        if self.sharded is None:
            return None
        weights, optim_state = gather_full_state(self.sharded, self.optimizer if with_optimizer else None)
        if self.rt.is_main:
            self.model.load_state_dict(weights)
        return optim_state

    @contextlib.contextmanager
    def model_on_device(self) -> Iterator[nn.Module]:
        """The plain model on the device. Under FSDP it waits on the CPU and visits the device
        only to be evaluated, so a full copy does not sit beside the shards all run long."""
        if self.sharded is not None:
            self.model.to(self.rt.device)
        try:
            yield self.model
        finally:
            if self.sharded is not None:
                self.model.cpu()

    def checkpoint(self) -> None:
        """Write the checkpoint from the main process. Every process must call it: under FSDP
        they all take part in gathering the shards."""
        optimizer = self.optimizer if self.sharded is None else self.pull_weights(with_optimizer=True)
        if self.rt.is_main:
            save_checkpoint(self.ckpt_dir, self.model, optimizer, self.generator, self.state,
                            self.fingerprint, self.settings)
        if self.rt.distributed:
            torch.distributed.barrier()

    def finish(self) -> None:
        """FSDP: leave the plain model as training without FSDP would: the trained weights, on
        the device (main process; the others keep theirs on the CPU), the shards released."""
        if self.sharded is None:
            return
        self.pull_weights()
        self.train_model = self.sharded = self.optimizer = None  # free the shards before the copy moves in
        if self.rt.is_main:
            self.model.to(self.rt.device)


def _start(model: nn.Module, config: LoopConfig, out: Path, rt: TrainRuntime, fingerprint: dict,
           resume: bool, log: Callable[[str], None]) -> _Trainer:
    """Move the model to its device (under FSDP: shard a copy of it), build the optimizer and
    sampler, and restore a checkpoint when resuming (refused when it was made with other settings)."""
    ckpt_dir = out / CHECKPOINT
    fingerprint = {**fingerprint, "loop": {k: v for k, v in asdict(config).items()
                                           if k in ("batch_size", "grad_accum", "seed", "lr", "weight_decay")}}
    fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON values, compared as loaded
    torch.manual_seed(config.seed + rt.rank)
    model.train()
    # FSDP trains a sharded copy: the plain model waits on the CPU for the gathered weights.
    model.to("cpu" if rt.fsdp else rt.device)
    sharded = shard_model(model, rt) if rt.fsdp else None
    trained = model if sharded is None else sharded
    optimizer = torch.optim.AdamW(
        param_groups(trained, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        **({"fused": True} if rt.device.type == "cuda" else {}),
    )
    generator = torch.Generator().manual_seed(config.seed)
    state = LoopState()
    if resume and not (ckpt_dir / "trainer.pt").is_file():
        if rt.is_main:
            log(f"no checkpoint in {ckpt_dir} yet: starting fresh")
        resume = False
    if resume:
        check_resume(ckpt_dir, fingerprint)
        state = load_checkpoint(ckpt_dir, model, optimizer, generator, sharded)
        if rt.is_main:
            log(f"resumed {ckpt_dir} at step {state.step} ({state.tokens:,} tokens)")
        if state.step >= config.max_steps and rt.is_main:
            log(f"the checkpoint is already at step {state.step} >= max_steps={config.max_steps}")
    # FSDP: compiled after sharding, as DDP wraps the compiled model: dynamo leaves FSDP's
    # gather / free hooks out of its graphs and compiles the blocks' math between them.
    train_model: nn.Module = torch.compile(trained) if config.compile else trained
    if rt.distributed and sharded is None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.is_main and config.parallel == "fsdp":
        log(f"FSDP: parameters, gradients and optimizer state sharded over {rt.world_size} processes"
            + (" (bf16 compute, fp32 gradient reduction)" if rt.bf16 else "") if rt.fsdp
            else "--parallel fsdp with one process: training the plain model")
    return _Trainer(model, train_model, optimizer, generator, state, rt, ckpt_dir, fingerprint, asdict(config),
                    sharded)


def _optimizer_step(t: _Trainer, config: LoopConfig, batches: BatchSource, loss_fn: LossFn) -> tuple[float, int, float | None, float]:
    """One optimizer step over grad_accum micro-steps: (mean loss, tokens, gradient norm, lr)."""
    rt = t.rt
    lr = lr_at(t.state.step, config)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    step_loss, step_tokens = 0.0, 0
    for micro in range(config.grad_accum):
        # Every rank draws the same world-sized stream and keeps its own share, so the
        # sampler state is identical on all ranks and one checkpoint restores them all.
        for r in range(rt.world_size):
            batch = batches.next_batch(t.generator)
            if r == rt.rank:
                mine = batch
        batch = tuple(x.to(rt.device, non_blocking=True) for x in mine)
        last = micro == config.grad_accum - 1
        # DDP skips the all-reduce on all but the last micro-step. FSDP reduce-scatters on every
        # one: its gradients live sharded, and unsynced ones would be held at full size.
        sync = contextlib.nullcontext() if (last or not rt.distributed or rt.fsdp) else t.train_model.no_sync()
        with sync, rt.autocast():
            loss, n_tokens = loss_fn(t.train_model, batch)
        (loss / config.grad_accum).backward()
        step_loss += loss.item() / config.grad_accum
        step_tokens += n_tokens * rt.world_size
    if rt.distributed:
        # Log the loss of the whole global batch, not the main process's share of it.
        total = torch.tensor(step_loss, dtype=torch.float64, device=rt.device)
        torch.distributed.all_reduce(total)  # a sum: gloo has no average
        step_loss = total.item() / rt.world_size
    grad_norm = None
    if config.grad_clip > 0:
        # Under FSDP the parameters are DTensor shards: clip_grad_norm_ scales them by the
        # global norm and returns it as a DTensor, made a plain tensor by full_tensor().
        norm = torch.nn.utils.clip_grad_norm_(t.params, config.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return step_loss, step_tokens, grad_norm, lr


class _RunLog:
    """The JSONL metrics log (main process only) and the progress: a bar on a terminal, else
    one plain line per logged step and per validation, so a log file stays readable."""

    def __init__(self, path: Path, rt: TrainRuntime, progress: bool, total: int, initial: int, desc: str,
                 log: Callable[[str], None]):
        self.file = open(path, "a", encoding="utf-8") if rt.is_main else None
        self.bar = None
        self.lines = progress and rt.is_main and not progress_wanted()
        self.total, self.desc, self.log = total, desc, log
        if progress and rt.is_main and not self.lines:
            self.bar = progress_bar(desc=desc, unit="step", total=total, initial=initial, leave=True)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def report(self, step: int, values: dict) -> None:
        """Show the latest figures: on the bar, or as a line of the log."""
        if not values:
            return
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
        elif self.lines:
            self.log(f"{self.desc} step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in values.items()))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def run_loop(
    model: nn.Module,
    config: LoopConfig,
    out: str | Path,
    batches: BatchSource,
    loss_fn: LossFn = lm_loss,
    evaluate: Callable[[nn.Module], dict] | None = None,
    *,
    runtime: TrainRuntime | None = None,
    fingerprint: dict | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> LoopResult:
    """Train `model` for config.max_steps optimizer steps.

    evaluate(model) -> dict of metrics runs every eval_interval steps and at the end.
    fingerprint: the settings a checkpoint must share to be resumed (model shape, data, ...).
    on_step(step) is called after each optimizer step (tests use it to interrupt a run).
    On KeyboardInterrupt a checkpoint is written before the interrupt is passed on.

    With config.parallel "fsdp" under torchrun, a sharded copy of `model` is trained and
    `model` itself stays plain: evaluate() and the checkpoints get it with the weights
    gathered from the shards, and at the end the main process's `model` holds the trained
    weights on the device (the other processes' copies are stale: stages save from rank 0).
    """
    config.validate()
    out = Path(out)
    rt = runtime or setup_runtime(config)
    t = _start(model, config, out, rt, fingerprint or {}, resume, log)
    state = t.state
    run_log = _RunLog(out / "log.jsonl", rt, progress, config.max_steps, state.step, desc, log)
    peak = gpu_peak_flops(rt.device)
    try:
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < config.max_steps:
            t0 = time.perf_counter()
            step_loss, step_tokens, grad_norm, lr = _optimizer_step(t, config, batches, loss_fn)
            state.step += 1
            state.tokens += step_tokens
            state.elapsed += time.perf_counter() - t0
            window_tokens += step_tokens
            if on_step is not None:
                on_step(state.step)
            at_end = state.step == config.max_steps
            if state.step % config.log_interval == 0 or at_end:
                tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                record = {"event": "train", "step": state.step, "loss": step_loss, "lr": lr,
                          "tokens": state.tokens, "tokens_per_s": tok_s, "grad_norm": grad_norm}
                if flops_per_token is not None:
                    record["tflops"] = tok_s * flops_per_token / 1e12
                    if peak:
                        record["mfu"] = tok_s * flops_per_token / (peak * rt.world_size)
                run_log.write(record)
                run_log.report(state.step, {"loss": f"{step_loss:.3f}", "tok_s": f"{tok_s:,.0f}"})
                window_tokens, window_start = 0, time.perf_counter()
            run_log.advance()
            evaluating = (state.step % config.eval_interval == 0 or at_end) and evaluate is not None
            if evaluating:
                t.pull_weights()  # FSDP: every process takes part in gathering the weights evaluated
            if evaluating and rt.is_main:
                with t.model_on_device():
                    result = evaluate(model)
                record = {"step": state.step, "tokens": state.tokens, **result}
                state.history.append(record)
                run_log.write({"event": "eval", **record})
                run_log.report(state.step, {k: f"{v:.3f}" for k, v in result.items() if isinstance(v, float)})
                window_start = time.perf_counter()  # keep validation out of tokens/s
            if state.step % config.checkpoint_interval == 0 or at_end:
                t.checkpoint()
    except KeyboardInterrupt:
        # Every interrupted process takes part (FSDP gathers the shards; DDP meets at the
        # barrier); the main one writes the files.
        t.checkpoint()
        if rt.is_main:
            log(f"\ninterrupted at step {state.step}; checkpoint saved in {t.ckpt_dir}: rerun with --resume to continue")
        raise
    finally:
        run_log.close()
    t.finish()

    metrics = {"steps": state.step, "train_tokens": state.tokens, "train_seconds": round(state.elapsed, 2),
               "tokens_per_s": state.tokens / max(state.elapsed, 1e-9)}
    if state.history:
        metrics.update({k: v for k, v in state.history[-1].items() if k not in ("step", "tokens")})
    return LoopResult(model, state, metrics)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# The frame of every training stage


def claim_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a training stage may write into out: a checkpoint already there is continued
    (resume), discarded with its log (overwrite), or else the stage is refused, so no run
    silently replaces earlier work."""
    ckpt = out / CHECKPOINT
    if (ckpt / "trainer.pt").is_file() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{out} already holds a training checkpoint; pass --resume to continue it, "
                "or --overwrite to start over (the checkpoint is then replaced)"
            )
        shutil.rmtree(ckpt)
        (out / "log.jsonl").unlink(missing_ok=True)


@contextlib.contextmanager
def training_stage(config: LoopConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                   inputs: dict[str, str | Path | None] | None = None) -> Iterator[TrainRuntime]:
    """The frame every training stage runs in: check the settings, refuse an output folder that
    is one of the stage's inputs (the parent is never overwritten), claim the output (see
    claim_output), set up the device and process group, and always leave the process group.

        with training_stage(config, config.out, resume=resume, overwrite=overwrite,
                            inputs={"--teacher": config.teacher}) as rt:
            ...
    """
    config.validate()
    out = Path(out)
    for flag, folder in (inputs or {}).items():
        if folder and Path(folder).exists() and Path(folder).resolve() == out.resolve():
            raise ConfigError(f"--out must differ from {flag}: the stage never writes over its input ({out})")
    claim_output(out, resume, overwrite)
    rt = setup_runtime(config)
    try:
        yield rt
        if rt.distributed:
            torch.distributed.barrier()
    finally:
        cleanup_distributed()
