"""The lm task: continued pretraining on domain text, judged by perplexity on the domain's
held-out text and on the parent's own held-out text (how much general ability is kept)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import LoadedModel, save_model
from ..calibration import heldout_tokens
from ..data import DataConfig, TokenShards, is_data_folder, prepare_data, prepared_matches
from ..errors import ConfigError, DataError
from ..evaluation import mean_loss, model_logits_fn, perplexity
from ..lineage import require_same_tokenizer, same_tokenizer
from ..training import WindowBatches, lm_loss
from .config import STAGE, FinetuneConfig
from .task import TaskRun, task_max_length


def lm_task(config: FinetuneConfig, parent: LoadedModel, log: Callable[[str], None]) -> TaskRun:
    """The lm task's TaskRun: random windows of the domain text, next-token loss."""
    tok = parent.tokenizer
    block = task_max_length(config, parent)
    data_dir = domain_data(config, parent, log)
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    train.check_window(block)
    val_tokens = torch.from_numpy(val.all_tokens()[: config.eval_max_tokens].astype(np.int64))
    if val_tokens.numel() < 2:
        raise DataError(f"the held-out split of {config.data} has {val_tokens.numel()} tokens; give more text")
    general = general_tokens(parent, config.eval_max_tokens, log)
    windows = val.fixed_windows(16, min(block, val.n_tokens - 1))
    val_batches = [(torch.cat([x for x, _ in windows]), torch.cat([y for _, y in windows]))]

    def evaluate(model):
        loss = mean_loss(model, val_batches, next(model.parameters()).device, contextlib.nullcontext())
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def report(model, phase):
        device = next(model.parameters()).device
        fn = model_logits_fn(model, device)
        out = {"domain_val_ppl": perplexity(fn, val_tokens, block).perplexity, "domain_val_tokens": int(val_tokens.numel())}
        if general is not None:
            out["general_val_ppl"] = perplexity(fn, general, block).perplexity
            out["general_val_tokens"] = int(general.numel())
        return out

    def save(out, model, metrics, extra):
        save_model(out, model, tok, stage=STAGE, settings=config.to_dict(), parent=config.model, metrics=metrics,
                   extra={**extra, "data": str(data_dir)})

    return TaskRun(model=parent.model, batches=WindowBatches(train, config.batch_size, block), loss_fn=lm_loss,
                   evaluate=evaluate, report=report, save=save,
                   fingerprint={"data": str(Path(data_dir).resolve()), "block": block})


def domain_data(config: FinetuneConfig, parent: LoadedModel, log: Callable[[str], None]) -> Path:
    """A prepared data folder of the domain text, tokenized with the parent's tokenizer: --data
    itself when it is one (and shares the tokenizer), else OUT/data, reused while unchanged."""
    tok = parent.tokenizer
    if is_data_folder(config.data):
        require_same_tokenizer(
            config.data, tok,
            f"{config.data} was tokenized with another tokenizer than {config.model}'s; "
            "pass the raw text as --data so it is tokenized with the model's tokenizer",
        )
        return Path(config.data)
    if config.val_data:
        raise ConfigError("--val-data is not used by the lm task: the held-out text is a document split of "
                          "--data (set its share with --val-fraction)")
    data_cfg = DataConfig(source=config.data, vocab_size=tok.vocab_size, val_fraction=config.val_fraction,
                          text_field=config.text_field)
    folder = Path(config.out) / "data"
    if not (same_tokenizer(folder, tok) and prepared_matches(folder, data_cfg)):
        log(f"tokenizing {config.data} with the parent's tokenizer...")
        prepare_data(data_cfg.replace(out=str(folder), tokenizer=str(parent.folder)), log=log)
    return folder


def general_tokens(parent: LoadedModel, limit: int, log: Callable[[str], None]) -> torch.Tensor | None:
    """The parent's own held-out text (how much general ability finetuning keeps), if known."""
    try:
        tokens, _ = heldout_tokens(parent.folder, parent.manifest, parent.tokenizer)
    except (ConfigError, DataError) as e:
        log(f"note: no general validation text for {parent.folder} ({e}); general perplexity not reported")
        return None
    return tokens[:limit] if tokens.numel() >= 2 else None
