"""The pretraining stage: text -> tokenizer and token shards -> a GPT trained from scratch ->
a teacher artifact. Runs on the shared training loop (compactgpt.training), on CUDA with bf16
when a GPU is visible, under torchrun for several processes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .artifacts import read_manifest, save_model
from .config import StageConfig, option, run_option
from .data import STDLIB, DataConfig, TokenShards, is_data_folder, prepare_data, prepared_matches
from .device import DEVICE_HELP, cpu_threads, resolve_device
from .errors import ConfigError
from .evaluation import mean_loss, model_logits_fn, perplexity
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer
from .training import (LoopConfig, TrainRuntime, WindowBatches, flops_per_token, lm_loss, run_loop,
                       training_stage)

STAGE = "pretrain"

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "dropout")


@dataclass
class TrainConfig(LoopConfig):
    """Settings of the pretraining stage; one CLI flag per field; saved in the artifact."""

    data: str = option(STDLIB, "training text: a file, folder, glob, JSONL file, prepared data folder, or @stdlib "
                       "(the Python standard library's sources; the default)")
    out: str = option("runs/teacher", "artifact folder to write (checkpoints go in OUT/checkpoint)")
    preset: str = option("small", "model and schedule preset: tiny (tests), small (CPU), gpt2-124m (GPU)")
    vocab_size: int = option(8192, "BPE vocabulary size when the data is tokenized here")
    val_fraction: float = option(0.05, "share of documents held out for validation")
    text_field: str = option("text", "JSONL field that holds the text")
    block_size: int = option(256, "tokens per training window (<= n-positions)")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block")
    n_embd: int = option(256, "embedding width")
    n_inner: int | None = option(None, "MLP width (default 4 x n-embd)")
    n_positions: int = option(256, "longest context (learned positions)")
    dropout: float = option(0.0, "dropout rate")
    eval_batches: int = option(40, "validation windows per evaluation")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    overwrite: bool = run_option("overwrite", "discard an existing checkpoint in OUT and start over")
    resume: bool = run_option("resume")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress", "progress bar on a terminal (--no-progress: none; logs still go to "
                                "OUT/log.jsonl)")

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
        try:
            self.model_config(self.vocab_size)  # positive sizes, heads that divide the width
        except ValueError as e:
            raise ConfigError(f"{e} (set by --n-layer, --n-head, --n-embd, --n-inner, --n-positions)") from None
        if self.vocab_size < 258:
            raise ConfigError(f"vocab_size must be at least 258 (256 bytes, <|endoftext|> and one merge), "
                              f"got {self.vocab_size}")
        if not 0 < self.val_fraction < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"val_fraction must be in (0, 1) and dropout in [0, 1); got {self.val_fraction}, "
                              f"{self.dropout}")
        if self.block_size < 2 or self.eval_batches < 1:
            raise ConfigError(f"block_size must be >= 2 (a window predicts its next tokens) and eval_batches >= 1; "
                              f"got {self.block_size}, {self.eval_batches}")
        if self.block_size > self.n_positions:
            raise ConfigError(
                f"block_size={self.block_size} is longer than n_positions={self.n_positions}: the "
                "model has no position embedding past n_positions; lower --block-size"
            )


# Presets fill every field they name; explicit settings override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and smoke runs.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, block_size=64, vocab_size=512,
                 batch_size=8, max_steps=50, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=25,
                 checkpoint_interval=25, log_interval=5, eval_batches=8),
    # The CPU default: a short run on a few cores that writes recognisable Python.
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


def prepare_or_reuse_data(config: TrainConfig, rt: TrainRuntime, log) -> Path:
    """A prepared data folder for config.data: used as is, or prepared under out/data
    (and reused while its settings and source files are unchanged)."""
    if is_data_folder(config.data):
        return Path(config.data)
    data_cfg = DataConfig(source=config.data, vocab_size=config.vocab_size,
                          val_fraction=config.val_fraction, text_field=config.text_field)
    folder = Path(config.out) / "data"
    if rt.is_main and not prepared_matches(folder, data_cfg):
        log(f"preparing data from {config.data} (tokenizer of {config.vocab_size} tokens)...")
        # OUT/data belongs to this run (OUT is claimed): a stale copy is replaced.
        prepare_data(data_cfg.replace(out=str(folder), overwrite=True), log=log)
    if rt.distributed:
        torch.distributed.barrier()
    return folder


def pretrain(config: TrainConfig, log: Callable[[str], None] = print,
             on_step: Callable[[int], None] | None = None) -> Path:
    """Train a GPT from scratch on config.data and write a model artifact to config.out.

    on_step: called after every optimizer step (tests interrupt runs with it). Returns the
    artifact folder. Raises ConfigError when out holds a checkpoint and neither config.resume
    nor config.overwrite is set (no run silently replaces earlier work).
    """
    out = Path(config.out)
    with cpu_threads(config.threads), training_stage(config, out, resume=config.resume, overwrite=config.overwrite,
                                                     inputs={"--data": config.data}, stage=STAGE) as rt:
        out.mkdir(parents=True, exist_ok=True)
        data_dir = prepare_or_reuse_data(config, rt, log)
        tokenizer = Tokenizer.from_folder(data_dir)
        train = TokenShards(data_dir, "train")
        val = TokenShards(data_dir, "val")
        train.check_window(config.block_size)
        model_config = config.model_config(tokenizer.vocab_size)
        torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
        # The rows padding the vocabulary to a multiple of 64 are masked in evaluation, as
        # they are when the written folder is loaded: the figures here are the folder's.
        model = GPT(model_config).limit_vocab(tokenizer.vocab_size)
        val_batches = val.validation_batches(config.eval_batches, config.block_size)

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
            runtime=rt, fingerprint=fingerprint, resume=config.resume,
            flops_per_token=flops_per_token(model_config, config.block_size), log=log,
            progress=config.progress, on_step=on_step, desc="pretrain",
        )
        if rt.is_main:
            _save_teacher(config, out, model, tokenizer, data_dir, val, result.metrics, rt, log)
    return out


def _save_teacher(config: TrainConfig, out: Path, model: GPT, tokenizer: Tokenizer, data_dir: Path,
                  val: TokenShards, loop_metrics: dict, rt: TrainRuntime, log) -> None:
    """Score the whole validation split and write the artifact."""
    metrics = dict(loop_metrics)
    model.eval()
    n_positions = model.config.n_positions
    ppl = perplexity(model_logits_fn(model, rt.device), torch.from_numpy(val.all_tokens().astype("int64")),
                     max_length=n_positions, stride=n_positions // 2)
    metrics["val_perplexity"] = ppl.perplexity
    metrics["val_tokens_scored"] = ppl.tokens
    data_manifest = read_manifest(data_dir)
    if data_manifest is not None:
        metrics["unigram_val_perplexity"] = data_manifest.metrics.get("unigram_val_perplexity")
    metrics["parameters"] = model.num_parameters()
    metrics["non_embedding_parameters"] = model.num_parameters(non_embedding=True)
    save_model(out, model.cpu(), tokenizer, stage=STAGE, settings=config.to_dict(), parent=data_dir, metrics=metrics)
    log(f"wrote {out}: val perplexity {ppl.perplexity:.2f} over {ppl.tokens:,} tokens "
        f"(unigram level {metrics.get('unigram_val_perplexity') or float('nan'):.2f})")


# ---------------------------------------------------------------------------------------
# An existing model as the teacher

ADOPT_STAGE = "import"


@dataclass
class AdoptConfig(StageConfig):
    """Settings of the import stage (an existing model as the teacher); model and data are saved
    in the artifact."""

    model: str = option("", "GPT-2 model to use as the teacher: a folder, or a hub id where a network exists")
    data: str = option("", "data folder tokenized with the model's own tokenizer: the teacher's lineage, on which "
                       "later stages distill, calibrate and evaluate")
    # The folder written is the artifact itself: not one of its settings.
    out: str = option("", "artifact folder to write", saved=False)
    device: str = option("auto", f"where the model is scored: {DEVICE_HELP}", saved=False)
    overwrite: bool = run_option("overwrite")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress")

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"the import stage needs {name}: set AdoptConfig.{name}")
        resolve_device(self.device)  # a device this machine lacks is refused before any work


def adopt_teacher(config: AdoptConfig, log: Callable[[str], None] = print) -> Path:
    """Use an existing GPT-2 model (a folder, or a hub id where a network exists) as the
    teacher instead of pretraining one: it is written to config.out as a CompactGPT artifact
    whose lineage is config.data, a data folder tokenized with the model's own tokenizer, on
    which later stages distill, calibrate and evaluate; its validation perplexity there is
    recorded.

    Returns the folder. Raises ArtifactError for a folder that is not a GPT-2 model,
    ConfigError when the data was tokenized with another tokenizer or for an out that
    claim_output refuses (an input folder, another artifact unless config.overwrite).
    """
    from .artifacts import load_model, parent_record, resolve_model_path
    from .calibration import data_folder_tokens
    from .outputs import claim_output

    source, data, out = config.model, config.data, Path(config.out)
    folder = resolve_model_path(source)
    with cpu_threads(config.threads), claim_output(out, stage=ADOPT_STAGE, inputs={"--model": folder, "--data": data},
                                                   overwrite=config.overwrite):
        loaded = load_model(folder, device=resolve_device(config.device))
        tokens = data_folder_tokens(data, loaded.tokenizer, folder)
        n_positions = loaded.model.config.n_positions
        ppl = perplexity(model_logits_fn(loaded.model), tokens, max_length=n_positions, stride=n_positions // 2,
                         progress=config.progress)
        model = loaded.model
        metrics = {"val_perplexity": ppl.perplexity, "val_tokens_scored": ppl.tokens,
                   "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(True)}
        save_model(out, model.cpu(), loaded.tokenizer, stage=ADOPT_STAGE, settings=config.to_dict(), parent=data,
                   metrics=metrics, extra={"source": parent_record(folder, relative_to=out)})
    log(f"wrote {out}: {source} as the teacher ({model.num_parameters():,} parameters), val perplexity "
        f"{ppl.perplexity:.2f} over {ppl.tokens:,} tokens of {data}")
    return out
