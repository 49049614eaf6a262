"""The instruct task: instruction tuning with a stored prompt template. Examples become
(ids, response-only targets); the loss and the held-out perplexity count response tokens
only; sample answers go through the template, which the artifact stores and `generate` reuses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import LoadedModel, Manifest, load_model, save_model
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import Tokenizer
from .config import STAGE, FinetuneConfig, config_from_settings
from .data import (IGNORE_INDEX, TEMPLATE_FILE, BucketBatches, Instruction, PromptTemplate, fit_example,
                   length_batches, pad_right, random_split, read_instructions, resolve_template, response_labels)
from .task import TaskRun, task_max_length


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
    logits = model(ids).logits
    total, n = response_loss_sum(logits, targets)
    return total / max(n, 1), int(mask.sum())


def instruction_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
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
        s, n = response_loss_sum(model(ids.to(device)).logits, targets.to(device))
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


def prompt_for_generation(folder: str | Path, prompt: str) -> str:
    """The text `generate` feeds the model: the prompt inside the artifact's stored template
    (as the instruction) when it has one, else the prompt as is."""
    template = stored_template(folder)
    return template.prompt(prompt) if template is not None and prompt else prompt


def instruct_split(config: FinetuneConfig) -> tuple[list[Instruction], list[Instruction]]:
    """(train records, held-out records) exactly as the stage splits them; evaluating an
    instruction-tuned model calls it again to rebuild the held-out set."""
    records = read_instructions(config.data)
    if config.val_data:
        return records, read_instructions(config.val_data)
    tr, va = random_split(len(records), config.val_fraction, config.seed)
    return [records[i] for i in tr], [records[i] for i in va]


def instruct_task(config: FinetuneConfig, parent: LoadedModel, log: Callable[[str], None]) -> TaskRun:
    """The instruct task's TaskRun: length-bucketed examples, response-only loss, held-out
    response perplexity and sample answers before and after."""
    tok = parent.tokenizer
    max_len = task_max_length(config, parent)
    template = resolve_template(config.template)
    train_recs, val_recs = instruct_split(config)
    encode = lambda r: encode_instruction(tok, template, r, max_len, config.min_response_tokens)
    train_ex = [encode(r) for r in train_recs]
    val_ex = [encode(r) for r in val_recs]
    truncated = sum(1 for r, (ids, _) in zip(train_recs, train_ex) if len(ids) == max_len)
    if truncated:
        log(f"note: {truncated} of {len(train_ex)} training examples reach --max-length {max_len} and were truncated")
    train_batches = instruction_batches(train_ex, config.batch_size, tok.eot_id)
    val_batches = instruction_batches(val_ex, config.batch_size, tok.eot_id)
    samples = val_recs[: config.eval_samples]
    sample_log: list[dict] = [{"where": r.where, "instruction": r.instruction, "input": r.input,
                               "reference": r.output} for r in samples]

    def report(model, phase):
        out = {**heldout_response_loss(model, val_batches), "val_examples": len(val_ex)}
        for rec, entry in zip(samples, sample_log):
            entry[phase] = generate_response(model, tok, template.prompt(rec.instruction, rec.input),
                                             min(config.sample_tokens, max_len - 1))
        return out

    def save(out, model, metrics, extra):
        write = lambda p: p.write_text(json.dumps(template.to_dict(), indent=2), encoding="utf-8")
        save_model(out, model, tok, stage=STAGE, settings=config.to_dict(), parent=config.model, metrics=metrics,
                   extra={**extra, "template": template.to_dict(), "samples": sample_log},
                   extra_files={TEMPLATE_FILE: write})

    return TaskRun(model=parent.model, batches=BucketBatches(train_batches), loss_fn=response_loss,
                   evaluate=lambda m: {k: v for k, v in heldout_response_loss(m, val_batches).items()
                                       if k != "val_response_tokens"},
                   report=report, save=save,
                   fingerprint={"data": config.data, "val_data": config.val_data, "template": template.to_dict(),
                                "max_length": max_len},
                   extra={"train_examples": len(train_ex), "val_examples": len(val_ex), "truncated": truncated,
                          "samples": sample_log})


def is_instruction_model(manifest: Manifest | None) -> bool:
    """True when a manifest (or None) records an instruct finetuning run."""
    return manifest is not None and manifest.stage == STAGE and manifest.settings.get("task") == "instruct"


def evaluate_instruct(folder: str | Path, max_length: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Held-out response loss and perplexity of an instruction-tuned model on the split its
    finetuning held out (rebuilt from the manifest's settings), run on `device`.

    Returns {data, examples, val_response_loss, val_response_ppl, val_response_tokens}.
    Raises ConfigError when the folder is not an instruction-tuned artifact or lacks its
    stored template.
    """
    loaded = load_model(folder, device=device)  # heldout_response_loss moves the batches there
    if not is_instruction_model(loaded.manifest):
        raise ConfigError(f"{folder} is not an instruction-tuned model (compactgpt finetune --task instruct)")
    config = config_from_settings(loaded.manifest.settings)
    template = stored_template(folder)
    if template is None:
        raise ConfigError(f"{folder} lacks {TEMPLATE_FILE}; the folder is incomplete")
    n_positions = loaded.model.config.n_positions
    max_len = min(max_length or config.max_length or n_positions, n_positions)
    _, val = instruct_split(config)
    examples = [encode_instruction(loaded.tokenizer, template, r, max_len, config.min_response_tokens) for r in val]
    result = heldout_response_loss(loaded.model, instruction_batches(examples, 16, loaded.tokenizer.eot_id))
    return {"data": f"held-out split of {config.data}", "examples": len(examples), **result}
