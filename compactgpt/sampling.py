"""Generation, written once for every runtime: prefill, sample, stop tokens, left padding.

A runtime (PyTorch's `GPT.stream`, ONNX Runtime's `OnnxDecoder.stream`) supplies only a step
function that runs its model on new tokens after the ones it has cached and returns the last
position's logits; `stream_tokens` does the rest, so every runtime checks the same things,
raises the same errors and picks the same tokens from the same logits:

    def step(input_ids, position_ids, attention_mask):  # (B, T), (B, T), (B, P+T) or None
        ...                                              # -> logits of the last position (B, V)

Sampling follows transformers' order: the repetition penalty first (a logits processor), then
temperature, top-k and top-p (warpers), then one draw; temperature 0 is greedy.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from .errors import ConfigError

# (input_ids (B, T), position_ids (B, T), attention_mask over past and new tokens (B, P+T),
# None when no row is padded) -> logits of the last new position (B, V).
Step = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> None:
    """Raise ConfigError naming the first sampling setting out of its range."""
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = off, above 1 discourages repeats), "
                          f"got {repetition_penalty}")


def tokens_held(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which token ids each row of input_ids holds at a real (mask 1) position. A
    padding position's id is no repeat; ids are counted, not assigned, as one id may sit at a
    padding position and at a real one."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, attention_mask.long()) > 0


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """logits (B, V) with every token marked in `seen` (B, V) made less likely, as transformers'
    RepetitionPenaltyLogitsProcessor does: a positive logit divided by the penalty, a negative
    one multiplied by it. penalty 1 returns the logits unchanged."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (B, V): greedy at temperature 0, else sample.

    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability
    reaches p (always at least the most likely token). Raises ConfigError for settings out of range.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_tokens(
    step: Step,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    n_positions: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B,) one step at a time from a model run by `step` (see Step).

    Prompts of different lengths are left-padded, attention_mask (B, T) marking real tokens:
    positions then start at 0 at each prompt's first real token. A sequence that produced a
    stop token keeps producing it; the stream ends when all have stopped, or after
    max_new_tokens, with no model call after the last token. repetition_penalty (1 = off)
    lowers the logits of every token already in the row (prompt and generated, padding not).
    Raises ConfigError for an empty prompt, a prompt plus new tokens longer than n_positions,
    or sampling settings out of range.
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    B, T = input_ids.shape
    if T == 0:
        raise ConfigError("the prompt is empty; give at least one token (e.g. <|endoftext|>)")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if T + max_new_tokens > n_positions:
        raise ConfigError(
            f"prompt of {T} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"{n_positions} positions; shorten the prompt or lower max_new_tokens"
        )
    if max_new_tokens == 0:
        return
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).to(device)
    padded = bool((mask == 0).any())
    # Left padding shifts positions so that each prompt's first real token is position 0.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = step(input_ids, positions, mask if padded else None)
    # Tracked only for a penalty, so that plain decoding (what the benchmarks time) pays nothing.
    seen = tokens_held(input_ids, mask, logits.shape[-1]).to(logits.device) if repetition_penalty != 1.0 else None
    next_pos = positions[:, -1:] + 1
    for i in range(max_new_tokens):
        logits = penalize_repeats(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if len(stops):
            token = torch.where(done, stops[0], token)
            done |= torch.isin(token, stops)
        yield token
        if bool(done.all()) or i == max_new_tokens - 1:
            break  # no model call whose logits nobody reads
        if seen is not None:
            seen[torch.arange(B, device=seen.device), token.to(seen.device)] = True
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = step(token[:, None], next_pos, mask if padded else None)
        next_pos = next_pos + 1


def with_prompt(input_ids: torch.Tensor, tokens: Iterable[torch.Tensor]) -> torch.Tensor:
    """The prompt (B, T) followed by the streamed tokens (each (B,)): (B, T + n)."""
    new = list(tokens)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.device)], dim=1)
