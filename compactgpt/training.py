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
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from . import outputs
from .outputs import CHECKPOINT, CHECKPOINT_COMPLETE, find_checkpoint
from .config import StageConfig, option
from .device import DEVICE_HELP, resolve_device
from .progress import progress_bar, progress_wanted
from .data import TokenShards
from .errors import ArtifactError, ConfigError, StoppedBySignal, TrainingDiverged
from .io import atomic_write_text
from .model import Block, GPTConfig

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

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
    nan_skips: int = option(
        0, "steps with a non-finite loss or gradient norm to skip (their update is dropped) before training "
        "stops as diverged", saved=False)  # a safety margin, not a setting of the model written

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nan_skips < 0:
            raise ConfigError(f"nan_skips must be 0 or more, got {self.nan_skips}")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            # inf or nan would pass the comparisons below and only show as NaN weights later.
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"learning rate settings are inconsistent: lr={self.lr}, min_lr={self.min_lr}, "
                f"warmup_steps={self.warmup_steps}; need 0 <= min_lr <= lr, lr > 0, warmup_steps >= 0"
            )
        if self.weight_decay < 0 or self.grad_clip < 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(
                f"optimizer settings out of range: weight_decay={self.weight_decay}, grad_clip={self.grad_clip}, "
                f"beta1={self.beta1}, beta2={self.beta2}; need weight_decay >= 0, grad_clip >= 0 (0: off), "
                "0 <= beta1, beta2 < 1"
            )
        # AdamW moves a weight by up to lr / (1 - beta1) in its first step and scales it by
        # 1 - lr * weight_decay: factors torch cannot even turn into float32 are refused here,
        # not met as a RuntimeError mid-step. (Large but representable ones diverge cleanly.)
        if self.beta1 < 1 and max(self.lr / (1 - self.beta1), self.lr * self.weight_decay) >= FLOAT32_MAX:
            raise ConfigError(f"lr={self.lr} is too large for float32 weights (AdamW's step overflows); "
                              "use a far smaller --lr")
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
    skipped: int = 0  # steps whose update was dropped for a non-finite loss or gradient norm (nan_skips)


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
    (tmp / CHECKPOINT_COMPLETE).write_text("")  # last: a .tmp without it was cut short, and is never resumed
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    # A crash between the two renames leaves the checkpoint as .old or .tmp alone:
    # find_checkpoint finds it there, and resuming moves it back (recover_checkpoint).
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(out: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """find_checkpoint, with a checkpoint left as .tmp or .old by a save cut short renamed back
    to out/checkpoint. Returns out/checkpoint, or None when there is no checkpoint. Main process
    only (it renames folders)."""
    found = find_checkpoint(out)
    folder = Path(out) / CHECKPOINT
    if found is None or found == folder:
        return found
    found.rename(folder)
    log(f"recovered the checkpoint {folder} from {found.name} (its last save was cut short)")
    return folder


def _damaged(path: Path, reason: str) -> ArtifactError:
    return ArtifactError(f"{path} is damaged ({reason}): the checkpoint cannot be resumed; pass --overwrite "
                         "instead of --resume to start over")


def _why(error: Exception) -> str:
    """A short reason for a file that failed to load. torch.load's own messages can advise
    weights_only=False, which would run whatever code a damaged or foreign file holds."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    first = (str(error).strip().splitlines() or [""])[0]
    return type(error).__name__ if not first or "weights_only" in str(error) else first[:160]


def read_checkpoint_fingerprint(folder: Path) -> dict | None:
    path = folder / "fingerprint.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise _damaged(path, _why(e)) from None


def load_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator,
                    sharded: nn.Module | None = None) -> LoopState:
    """Restore a checkpoint into model, optimizer and generator; with FSDP (`sharded`, the copy
    the optimizer trains) the full weights and optimizer state are then split into its shards.
    Raises ArtifactError naming the file when one is missing or damaged."""
    weights_file, trainer_file = folder / "model.safetensors", folder / "trainer.pt"
    try:
        load_safetensors_model(model, str(weights_file))
    except Exception as e:  # safetensors has its own error type for cut or corrupted files
        raise _damaged(weights_file, _why(e)) from None
    if not all(torch.isfinite(w).all() for w in model.state_dict().values() if w.is_floating_point()):
        raise _damaged(weights_file, "non-finite weights")
    try:
        trainer = torch.load(trainer_file, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, foreign pickle, ...: the error types vary
        raise _damaged(trainer_file, _why(e)) from None
    keys = ("optimizer", "generator", "torch_rng", "cuda_rng", "state")
    if not isinstance(trainer, dict) or any(k not in trainer for k in keys):
        raise _damaged(trainer_file, f"not a trainer state: it needs {', '.join(keys)}")
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
    signalled: int = 0  # the signal (SIGTERM, SIGINT) that asked this process to stop; 0: none
    saved_step: int = -1  # the step of the checkpoint on disk (written or resumed by this run); -1: none

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

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite, on every process (each checks its shard)."""
        bad = torch.tensor(float(sum(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                                     for p in self.params)), device=self.rt.device)
        if self.rt.distributed:
            torch.distributed.all_reduce(bad)
        return bad.item() == 0

    def checkpoint(self) -> None:
        """Write the checkpoint from the main process. Every process must call it: under FSDP
        they all take part in gathering the shards. Raises TrainingDiverged instead when the
        weights are not finite, so the last good checkpoint is never replaced by a broken one."""
        if not self.weights_finite():
            # A step with a finite loss and gradient can still overflow the weights (a huge lr).
            raise TrainingDiverged(_diverged_message(self, "the weights are no longer finite"))
        optimizer = self.optimizer if self.sharded is None else self.pull_weights(with_optimizer=True)
        if self.rt.is_main:
            save_checkpoint(self.ckpt_dir, self.model, optimizer, self.generator, self.state,
                            self.fingerprint, self.settings)
        self.saved_step = self.state.step
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
    if resume and rt.is_main:
        recover_checkpoint(out, log)
    if resume and rt.distributed:
        torch.distributed.barrier()  # the others look for the checkpoint once it is back in place
    if resume and find_checkpoint(out) is None:
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
                    sharded, saved_step=state.step if resume else -1)


def _diverged_message(t: _Trainer, what: str) -> str:
    """TrainingDiverged's one line: where, what, the likely cause and the fix."""
    lr, clip = t.optimizer.param_groups[0]["lr"], t.settings["grad_clip"]
    kept = (f"the last good checkpoint (step {t.saved_step}) is kept in {t.ckpt_dir}"
            if t.saved_step >= 0 else "no checkpoint was written")
    fix = "and gradient clipping (--grad-clip 1.0)" if clip == 0 else "or a longer --warmup-steps"
    return (f"training diverged at step {t.state.step}: {what} (lr {lr:.3g} at that step); the learning rate is "
            f"likely too high: start over (--overwrite) with a lower --lr {fix}; {kept}")


@dataclass
class _StepResult:
    loss: float  # mean over the global batch
    tokens: int
    grad_norm: float  # global, before clipping
    lr: float
    finite: bool  # loss and gradient norm finite on every process: the update was applied
    stop: bool  # some process got SIGTERM: every process stops after this step


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """The global gradient norm, the gradients clipped to `clip` (0: not clipped). Under FSDP
    the parameters are DTensor shards: clip_grad_norm_ scales them by the global norm and
    returns it as a DTensor, made a plain tensor by full_tensor()."""
    # An infinite bound measures without clipping: the gradients are scaled by exactly 1.
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _optimizer_step(t: _Trainer, config: LoopConfig, batches: BatchSource, loss_fn: LossFn) -> _StepResult:
    """One optimizer step over grad_accum micro-steps. A step whose loss or gradient norm is
    not finite on any process is not applied (the weights stay as they were) on every process."""
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
    grad_norm = _grad_norm(t.params, config.grad_clip)
    finite, stop = math.isfinite(step_loss) and math.isfinite(grad_norm), t.signalled != 0
    if rt.distributed:
        # One all-reduce (a sum: gloo has no average) gives the loss of the whole global batch,
        # not the main process's share of it, and whether any process saw a non-finite value
        # or got SIGTERM: all then skip, diverge or stop at the same step, none left waiting.
        total = torch.tensor([step_loss, not finite, stop], dtype=torch.float64, device=rt.device)
        torch.distributed.all_reduce(total)
        step_loss = total[0].item() / rt.world_size
        finite, stop = total[1].item() == 0 and math.isfinite(step_loss), total[2].item() > 0
    if finite:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return _StepResult(step_loss, step_tokens, grad_norm, lr, finite, stop)


def _trim_log(path: Path, step: int) -> None:
    """Keep only the log records of steps up to `step`, where training (re)starts: a run stopped
    after its last checkpoint logged steps that the resumed run logs again. A line cut short by
    a kill goes too. Rewritten atomically, and only when something goes."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _sigterm_stops(t: _Trainer) -> Iterator[None]:
    """While the loop runs, SIGTERM (sent by `kill` and by job schedulers before they kill) and
    Ctrl-C (SIGINT) ask it to stop after the current step: the handler only notes the signal,
    and the loop then checkpoints and stops at a step boundary that every process agrees on,
    so an interrupt never lands between an optimizer update and the step count (which would
    make the resumed run repeat a step). A second Ctrl-C stops at once, as Ctrl-C always did.
    Python lets only the main thread set handlers; the previous ones are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        if signum == signal.SIGINT and t.signalled == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the step to end
        t.signalled = signum

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _skip_or_diverge(t: _Trainer, config: LoopConfig, step: _StepResult, run_log: "_RunLog") -> None:
    """A step whose update was dropped for a non-finite loss or gradient norm: logged and
    skipped while config.nan_skips allows, else TrainingDiverged (no checkpoint is written)."""
    t.state.skipped += 1
    what = f"loss {step.loss:.4g}, gradient norm {step.grad_norm:.4g}"
    if t.state.skipped > config.nan_skips:
        after = f" (after {config.nan_skips} skipped non-finite steps)" if config.nan_skips else ""
        raise TrainingDiverged(_diverged_message(t, f"{what}{after}"))
    # Strings: JSON has no nan or inf.
    run_log.write({"event": "skip", "step": t.state.step, "loss": str(step.loss), "grad_norm": str(step.grad_norm)})
    if t.rt.is_main:
        run_log.log(f"step {t.state.step}: {what}: update skipped "
                    f"({t.state.skipped} of --nan-skips {config.nan_skips})")


class _RunLog:
    """The JSONL metrics log (main process only) and the progress: a bar on a terminal, else
    one plain line per logged step and per validation, so a log file stays readable."""

    def __init__(self, path: Path, rt: TrainRuntime, progress: bool, total: int, initial: int, desc: str,
                 log: Callable[[str], None]):
        if rt.is_main:
            _trim_log(path, initial)
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

    def train(self, state: LoopState, step: _StepResult, tok_s: float, flops: float | None, peak: float | None,
              world_size: int) -> None:
        """Write and show the figures of a training step."""
        record = {"event": "train", "step": state.step, "loss": step.loss, "lr": step.lr,
                  "tokens": state.tokens, "tokens_per_s": tok_s, "grad_norm": step.grad_norm}
        if flops is not None:
            record["tflops"] = tok_s * flops / 1e12
            if peak:
                record["mfu"] = tok_s * flops / (peak * world_size)
        self.write(record)
        self.report(state.step, {"loss": f"{step.loss:.3f}", "tok_s": f"{tok_s:,.0f}"})

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
    On KeyboardInterrupt a checkpoint is written before the interrupt is passed on. SIGTERM
    stops the run after the current step the same way, raising StoppedBySignal (a
    KeyboardInterrupt). A step with a non-finite loss or gradient norm is not applied; past
    config.nan_skips such steps, TrainingDiverged is raised and the last checkpoint is kept.

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
    with _sigterm_stops(t):  # also over the checkpoint written on the way out
        try:
            window_tokens, window_start = 0, time.perf_counter()
            while state.step < config.max_steps:
                t0 = time.perf_counter()
                step = _optimizer_step(t, config, batches, loss_fn)
                state.step += 1
                state.tokens += step.tokens
                state.elapsed += time.perf_counter() - t0
                window_tokens += step.tokens
                if not step.finite:
                    _skip_or_diverge(t, config, step, run_log)
                if on_step is not None:
                    on_step(state.step)
                at_end = state.step == config.max_steps
                if (state.step % config.log_interval == 0 or at_end) and step.finite:
                    tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    run_log.train(state, step, tok_s, flops_per_token, peak, rt.world_size)
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
                if step.stop:
                    signum = t.signalled or signal.SIGTERM  # the signal may have reached another process only
                    raise StoppedBySignal(f"stopped by {signal.Signals(signum).name} at step {state.step}", signum)
        except KeyboardInterrupt as stop:
            # Every interrupted process takes part (FSDP gathers the shards; DDP meets at the
            # barrier); the main one writes the files.
            if t.saved_step != state.step:
                t.checkpoint()
            if rt.is_main:
                how = str(stop) if isinstance(stop, StoppedBySignal) else f"interrupted at step {state.step}"
                log(f"\n{how}; checkpoint saved in {t.ckpt_dir}: rerun with --resume to continue")
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


def checkpoint_rule(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a training stage may write into out: a checkpoint already there (also one a
    save cut short left as checkpoint.tmp / .old) is continued (resume), discarded with its
    log (overwrite), or else the stage is refused, so no run silently replaces earlier work."""
    if find_checkpoint(out) is None or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a training checkpoint; pass --resume to continue it, "
            "or --overwrite to start over (the checkpoint is then replaced)"
        )
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "log.jsonl").unlink(missing_ok=True)


@contextlib.contextmanager
def training_stage(config: LoopConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                   inputs: dict[str, str | Path | None] | None = None,
                   stage: str = "train") -> Iterator[TrainRuntime]:
    """The frame every training stage runs in: check the settings, claim and lock the output
    folder (compactgpt.outputs.claim_output: never an input or a folder above one, never another
    artifact unless overwrite), apply the checkpoint rule (checkpoint_rule), set up the
    device and process group, and always release the lock and leave the process group.

        with training_stage(config, config.out, resume=resume, overwrite=overwrite,
                            inputs={"--teacher": config.teacher}, stage="distill") as rt:
            ...
    """
    config.validate()
    out = Path(out)
    # Under torchrun only rank 0 locks (and clears a discarded checkpoint); the rank is read from
    # the environment because the lock must be taken before the process group is joined.
    main = int(os.environ.get("RANK", "0")) == 0
    claim = outputs.claim_output(out, stage=stage, inputs=inputs, overwrite=overwrite, resume=resume,
                                 trains=True, lock=main)
    try:
        if main:
            checkpoint_rule(out, resume, overwrite)
        rt = setup_runtime(config)
        try:
            yield rt
            if rt.distributed:
                torch.distributed.barrier()
        finally:
            cleanup_distributed()
    finally:
        claim.release()
