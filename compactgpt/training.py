"""The training loop, shared by every stage that trains (pretraining, finetuning, distillation).

`run_loop` owns what every stage needs the same way: AdamW with weight-decay groups, warmup +
cosine learning rate, gradient accumulation and clipping, bf16 autocast and optional
torch.compile on CUDA (fp32 on CPU), DDP under torchrun, periodic validation, a progress bar,
a JSONL metrics log, and checkpoints that hold model, optimizer, schedule position, RNG and
data-sampler state so that a resumed run continues exactly. A stage plugs in its own batches
(`BatchSource`) and loss (`LossFn`).

`pretrain` is the pretraining stage built on it: data -> tokenizer -> GPT -> artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from .artifacts import read_manifest, save_model
from .data import STDLIB, DataConfig, TokenShards, is_data_folder, prepare_data, prepared_matches
from .errors import ConfigError
from .evaluation import mean_loss, model_logits_fn, perplexity
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

CHECKPOINT = "checkpoint"

# ---------------------------------------------------------------------------------------
# Settings


@dataclass
class LoopConfig:
    """Optimizer, schedule and bookkeeping settings every training stage shares."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices and embeddings, not to biases or LayerNorm
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_interval: int = 200  # steps between validations (and at the end)
    checkpoint_interval: int = 200  # steps between checkpoints (and at the end)
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    compile: bool = False  # torch.compile the model (CUDA mainly; works on CPU with gcc)

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


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "dropout")


@dataclass
class TrainConfig(LoopConfig):
    """Settings of the pretraining stage; one CLI flag per field; saved in the artifact."""

    data: str = STDLIB  # text file, folder, glob, JSONL, prepared data folder, or @stdlib
    out: str = "runs/teacher"
    preset: str = "small"
    vocab_size: int = 8192  # tokenizer size when the data is prepared here
    val_fraction: float = 0.05
    text_field: str = "text"
    block_size: int = 256  # tokens per training window (<= n_positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_inner: int | None = None
    n_positions: int = 256
    dropout: float = 0.0
    eval_batches: int = 40  # validation windows per evaluation

    def model_config(self, vocab_size: int) -> GPTConfig:
        # Round the embedding up to a multiple of 64 rows: faster matmuls, same tokens.
        padded = -(-vocab_size // 64) * 64
        return GPTConfig(
            vocab_size=padded,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            dropout=self.dropout,
            bos_token_id=0,
            eos_token_id=0,
        )

    def validate(self) -> None:
        super().validate()
        if self.block_size > self.n_positions:
            raise ConfigError(
                f"block_size={self.block_size} is longer than n_positions={self.n_positions}: the "
                "model has no position embedding past n_positions; lower --block-size"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# Presets fill every field they name; explicit settings override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and smoke runs.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, block_size=64, vocab_size=512,
                 batch_size=8, max_steps=50, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=25,
                 checkpoint_interval=25, log_interval=5, eval_batches=8),
    # The CPU default: about 15 minutes on 2 cores, writes recognisable Python.
    "small": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, block_size=256, vocab_size=8192,
                  batch_size=16, max_steps=700, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                  eval_interval=100, checkpoint_interval=100, log_interval=10, eval_batches=40),
    # GPT-2 124M's shape, for a GPU: bf16, flash attention, fused AdamW.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, block_size=1024,
                      vocab_size=50257, batch_size=32, grad_accum=4, max_steps=5000, lr=6e-4,
                      min_lr=6e-5, warmup_steps=200, eval_interval=500, checkpoint_interval=500,
                      log_interval=10, eval_batches=20, weight_decay=0.1),
}


def config_from_preset(preset: str = "small", **overrides) -> TrainConfig:
    """A TrainConfig: the preset's values, then every override that is not None."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    config = TrainConfig(**values)
    config.validate()
    return config


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
    """Next-token cross-entropy; returns the mean loss and the number of target tokens."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), y.numel()


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
class Runtime:
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(config: LoopConfig) -> Runtime:
    """Pick device and precision; join the torchrun process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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

    return Runtime(device, autocast, rank, world, local_rank)


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
    weights_only=True), then swap the folder in whole so a crash never leaves half of one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_model(model, str(tmp / "model.safetensors"))
    trainer = {
        "optimizer": optimizer.state_dict(),
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


def load_checkpoint(folder: Path, model: nn.Module, optimizer, generator: torch.Generator) -> LoopState:
    load_safetensors_model(model, str(folder / "model.safetensors"))
    trainer = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(trainer["optimizer"])
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


def run_loop(
    model: nn.Module,
    config: LoopConfig,
    out: str | Path,
    batches: BatchSource,
    loss_fn: LossFn = lm_loss,
    evaluate: Callable[[nn.Module], dict] | None = None,
    *,
    runtime: Runtime | None = None,
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
    """
    config.validate()
    out = Path(out)
    rt = runtime or setup_runtime(config)
    ckpt_dir = out / CHECKPOINT
    fingerprint = {**(fingerprint or {}), "loop": {k: v for k, v in asdict(config).items()
                                                   if k in ("batch_size", "grad_accum", "seed", "lr", "weight_decay")}}
    fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON values, compared as loaded

    torch.manual_seed(config.seed + rt.rank)
    model.to(rt.device)
    model.train()
    use_fused = rt.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        **({"fused": True} if use_fused else {}),
    )
    generator = torch.Generator().manual_seed(config.seed)
    state = LoopState()
    if resume and not (ckpt_dir / "trainer.pt").is_file():
        if rt.is_main:
            log(f"no checkpoint in {ckpt_dir} yet: starting fresh")
        resume = False
    if resume:
        check_resume(ckpt_dir, fingerprint)
        state = load_checkpoint(ckpt_dir, model, optimizer, generator)
        if rt.is_main:
            log(f"resumed {ckpt_dir} at step {state.step} ({state.tokens:,} tokens)")
        if state.step >= config.max_steps and rt.is_main:
            log(f"the checkpoint is already at step {state.step} >= max_steps={config.max_steps}")

    train_model: nn.Module = model
    if config.compile:
        train_model = torch.compile(model)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    log_path = out / "log.jsonl"
    log_file = open(log_path, "a", encoding="utf-8") if rt.is_main else None
    bar = None
    if progress and rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=state.step, desc=desc, unit="step", dynamic_ncols=True)
    peak = gpu_peak_flops(rt.device)
    metrics: dict = {}

    def write_log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def run_eval() -> dict:
        if evaluate is None:
            return {}
        result = evaluate(model)
        record = {"step": state.step, "tokens": state.tokens, **result}
        state.history.append(record)
        write_log({"event": "eval", **record})
        return result

    def checkpoint() -> None:
        if rt.is_main:
            save_checkpoint(ckpt_dir, model, optimizer, generator, state, fingerprint, asdict(config))
        if rt.distributed:
            torch.distributed.barrier()

    try:
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < config.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_tokens = 0.0, 0
            for micro in range(config.grad_accum):
                # Every rank draws the same world-sized stream and keeps its own share, so the
                # sampler state is identical on all ranks and one checkpoint restores them all.
                for r in range(rt.world_size):
                    batch = batches.next_batch(generator)
                    if r == rt.rank:
                        mine = batch
                batch = tuple(t.to(rt.device, non_blocking=True) for t in mine)
                last = micro == config.grad_accum - 1
                sync = contextlib.nullcontext() if (last or not rt.distributed) else train_model.no_sync()
                with sync, rt.autocast():
                    loss, n_tokens = loss_fn(train_model, batch)
                (loss / config.grad_accum).backward()
                step_loss += loss.item() / config.grad_accum
                step_tokens += n_tokens * rt.world_size
            grad_norm = None
            if config.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += step_tokens
            dt = time.perf_counter() - t0
            state.elapsed += dt
            window_tokens += step_tokens
            if on_step is not None:
                on_step(state.step)
            if state.step % config.log_interval == 0 or state.step == config.max_steps:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                record = {"event": "train", "step": state.step, "loss": step_loss, "lr": lr,
                          "tokens": state.tokens, "tokens_per_s": tok_s, "grad_norm": grad_norm}
                if flops_per_token is not None:
                    record["tflops"] = tok_s * flops_per_token / 1e12
                    if peak:
                        record["mfu"] = tok_s * flops_per_token / (peak * rt.world_size)
                write_log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                window_tokens, window_start = 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            at_end = state.step == config.max_steps
            if state.step % config.eval_interval == 0 or at_end:
                result = run_eval() if rt.is_main else {}
                if bar is not None and result:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in result.items() if isinstance(v, float)})
                window_start = time.perf_counter()  # keep validation out of tokens/s
            if state.step % config.checkpoint_interval == 0 or at_end:
                checkpoint()
    except KeyboardInterrupt:
        if rt.is_main:
            checkpoint()
            log(f"\ninterrupted at step {state.step}; checkpoint saved in {ckpt_dir}: rerun with --resume to continue")
        raise
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()

    metrics["steps"] = state.step
    metrics["train_tokens"] = state.tokens
    metrics["train_seconds"] = round(state.elapsed, 2)
    metrics["tokens_per_s"] = state.tokens / max(state.elapsed, 1e-9)
    if state.history:
        metrics.update({k: v for k, v in state.history[-1].items() if k not in ("step", "tokens")})
    return LoopResult(model, state, metrics)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# The pretraining stage


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


def prepare_or_reuse_data(config: TrainConfig, rt: Runtime, log) -> Path:
    """A prepared data folder for config.data: used as is, or prepared under out/data
    (and reused while its settings and source files are unchanged)."""
    if is_data_folder(config.data):
        return Path(config.data)
    data_cfg = DataConfig(source=config.data, vocab_size=config.vocab_size,
                          val_fraction=config.val_fraction, text_field=config.text_field)
    folder = Path(config.out) / "data"
    if rt.is_main and not prepared_matches(folder, data_cfg):
        log(f"preparing data from {config.data} (tokenizer of {config.vocab_size} tokens)...")
        prepare_data(data_cfg, folder, log=log)
    if rt.distributed:
        torch.distributed.barrier()
    return folder


def pretrain(config: TrainConfig, log: Callable[[str], None] = print, progress: bool = True,
             on_step: Callable[[int], None] | None = None, overwrite: bool = False,
             resume: bool = False) -> Path:
    """Train a GPT from scratch on config.data and write a model artifact to config.out.

    Returns the artifact folder. Raises ConfigError when out holds a checkpoint and neither
    resume nor overwrite is given (no run silently replaces earlier work).
    """
    config.validate()
    out = Path(config.out)
    claim_output(out, resume, overwrite)
    rt = setup_runtime(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        data_dir = prepare_or_reuse_data(config, rt, log)
        tokenizer = Tokenizer.from_folder(data_dir)
        train = TokenShards(data_dir, "train")
        val = TokenShards(data_dir, "val")
        train.check_window(config.block_size)
        model_config = config.model_config(tokenizer.vocab_size)
        torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
        model = GPT(model_config)
        val_windows = val.fixed_windows(config.eval_batches, config.block_size)
        val_batches = [
            (torch.cat([x for x, _ in val_windows[i : i + 8]]), torch.cat([y for _, y in val_windows[i : i + 8]]))
            for i in range(0, len(val_windows), 8)
        ]

        def evaluate(m: nn.Module) -> dict:
            loss = mean_loss(m, val_batches, rt.device, rt.autocast())
            return {"val_loss": loss, "val_ppl": math.exp(loss)}

        fingerprint = {"model": model_config.to_dict(), "data": str(data_dir.resolve()), "block_size": config.block_size}
        if rt.is_main:
            log(f"model: {model.num_parameters():,} parameters ({model.num_parameters(True):,} non-embedding), "
                f"{model_config.n_layer} layers x {model_config.n_embd} wide; data: {train.n_tokens:,} train / "
                f"{val.n_tokens:,} val tokens; device {rt.device}")
        result = run_loop(
            model, config, out, WindowBatches(train, config.batch_size, config.block_size), lm_loss, evaluate,
            runtime=rt, fingerprint=fingerprint, resume=resume,
            flops_per_token=flops_per_token(model_config, config.block_size), log=log,
            progress=progress, on_step=on_step, desc="pretrain",
        )
        if rt.is_main:
            metrics = dict(result.metrics)
            model.eval()
            ppl = perplexity(model_logits_fn(model, rt.device), torch.from_numpy(val.all_tokens().astype("int64")),
                             max_length=model_config.n_positions, stride=model_config.n_positions // 2)
            metrics["val_perplexity"] = ppl.perplexity
            metrics["val_tokens_scored"] = ppl.tokens
            data_manifest = read_manifest(data_dir)
            if data_manifest is not None:
                metrics["unigram_val_perplexity"] = data_manifest.metrics.get("unigram_val_perplexity")
            metrics["parameters"] = model.num_parameters()
            metrics["non_embedding_parameters"] = model.num_parameters(non_embedding=True)
            save_model(out, model.cpu(), tokenizer, stage="pretrain", settings=config.to_dict(),
                       parent=data_dir, metrics=metrics)
            log(f"wrote {out}: val perplexity {ppl.perplexity:.2f} over {ppl.tokens:,} tokens "
                f"(unigram level {metrics.get('unigram_val_perplexity') or float('nan'):.2f})")
        if rt.distributed:
            torch.distributed.barrier()
        return out
    finally:
        cleanup_distributed()
