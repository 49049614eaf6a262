"""Instruction tuning pieces: examples as (ids, response-only targets), the response loss,
held-out response perplexity, and sample generations through the stored template."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .finetune_data import (IGNORE_INDEX, TEMPLATE_FILE, Instruction, PromptTemplate, fit_example, length_batches,
                            pad_right, response_labels)
from .model import GPT
from .tokenizer import Tokenizer


def encode_instruction(tokenizer: Tokenizer, template: PromptTemplate, record: Instruction, max_length: int,
                       min_response: int) -> tuple[list[int], list[int]]:
    """(input ids, targets) of one record: prompt, then response and <|endoftext|> (so the
    model learns to stop), with every prompt target set to IGNORE_INDEX."""
    prompt = tokenizer.encode(template.prompt(record.instruction, record.input))
    response = tokenizer.encode(record.output) + [tokenizer.eot_id]
    ids, n_prompt = fit_example(prompt, response, max_length, min_response)
    return ids, response_labels(ids, n_prompt)


def response_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over response targets, their count). logits (B, T, V), targets
    (B, T) already aligned (targets[t] is the token after position t), IGNORE_INDEX skipped."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def response_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token loss on response tokens only: prompt and padding targets are ignored.
    Returns (loss, real tokens read), the count the loop's throughput figures use."""
    ids, mask, targets = batch
    # Right padding: real tokens never attend to the padding after them, so the causal
    # fast path (no mask) gives the same logits at every position that is scored.
    logits = model(ids)
    total, n = response_loss_sum(logits, targets)
    return total / max(n, 1), int(mask.sum())


def make_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    """Length-bucketed (ids, mask, targets) batches; padding targets are IGNORE_INDEX."""
    out = []
    for idx in length_batches([len(ids) for ids, _ in examples], batch_size):
        ids, mask = pad_right([examples[i][0] for i in idx], pad_id)
        targets, _ = pad_right([examples[i][1] for i in idx], pad_id, value_pad=IGNORE_INDEX)
        out.append((ids, mask, targets))
    return out


@torch.no_grad()
def heldout_response_loss(model: nn.Module, batches) -> dict:
    """Mean response loss and perplexity over fixed held-out batches (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, _, targets in batches:
        s, n = response_loss_sum(model(ids.to(device)), targets.to(device))
        total += float(s)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_response_loss": loss, "val_response_ppl": math.exp(min(loss, 50.0)), "val_response_tokens": count}


def generate_response(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of a prompt up to <|endoftext|>, as text."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    room = model.config.n_positions - max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                          f"{model.config.n_positions} positions")
    ids = ids[-room:]
    device = next(model.parameters()).device
    new = []
    for token in model.stream(torch.tensor([ids], device=device), max_new_tokens, stop_tokens=(tokenizer.eot_id,)):
        t = int(token[0])
        if t == tokenizer.eot_id:
            break
        new.append(t)
    return tokenizer.decode(new)


def stored_template(folder: str | Path) -> PromptTemplate | None:
    """The prompt template an instruction-tuned artifact carries, or None."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    return PromptTemplate.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
