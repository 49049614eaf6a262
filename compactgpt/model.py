"""The GPT-2 model, in one file.

Written bottom-up: config, attention, MLP, block, GPT. Module and parameter names follow
Hugging Face's GPT-2 (`transformer.wte`, `h.{i}.attn.c_attn`, `ln_f`, ...) so that a
CompactGPT folder *is* a GPT-2 folder. The one difference in storage: CompactGPT keeps its
projections as `nn.Linear` (weight shape `(out, in)`), while GPT-2's `Conv1D` stores
`(in, out)`. `HF_TRANSPOSED` names the four projections whose weights are transposed when
converting between the two; nothing else changes.

Shapes in comments: B batch, T new tokens, P past tokens, C embedding width,
nh heads, hs head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sampling import stream_tokens, with_prompt

# Projections stored as (out, in) here and (in, out) in GPT-2's Conv1D layout.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# One (key, value) pair per layer, each (B, nh, P, hs).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPTOutput(NamedTuple):
    """What `GPT.forward` returns, whatever it was asked for; a field not asked for is None."""

    logits: torch.Tensor | None  # (B, T, V); None when `targets` asked for the loss alone
    past_key_values: KVCache | None = None  # with use_cache: the cache after the new tokens
    hidden_states: list[torch.Tensor] | None = None  # with output_hidden_states: n_layer + 1 of (B, T, C)
    loss: torch.Tensor | None = None  # with targets: the mean next-token cross-entropy, a scalar


@dataclass
class GPTConfig:
    """Every size a later stage may change. A pruned student is still a plain GPTConfig."""

    vocab_size: int = 50257  # rows of the embedding; may exceed the tokenizer's size (padding)
    n_positions: int = 1024  # learned positions: the longest context the model can read
    n_embd: int = 768  # residual width C; attention width too (GPT-2 ties them)
    n_layer: int = 12
    n_head: int = 12  # head width is n_embd // n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd as in GPT-2
    activation_function: str = "gelu_new"  # GPT-2's tanh approximation; "gelu" is the exact erf form
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # one rate for embeddings, attention and residuals
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose a head count that divides the embedding width"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig: activation_function={self.activation_function!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            # No padding and no past: the causal fast path (flash / memory-efficient kernels).
            # With a past and a single new token, every key is visible: no mask either.
            causal = past is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.c_proj(y), dropout, self.training), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(self.act(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past=None, mask=None):
        a, present = self.attn(self.ln_1(x), past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def attention_bias(
    attention_mask: torch.Tensor | None, n_new: int, n_past: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive attention bias (B or 1, 1, T, P+T), or None when the causal fast path applies.

    attention_mask: (B, P+T) with 1 for real tokens and 0 for padding, as in transformers.
    A large negative number rather than -inf keeps rows that see no key (padding queries)
    finite: their output is garbage that nobody reads, but it is never NaN.
    """
    if attention_mask is None and (n_past == 0 or n_new == 1):
        return None
    total = n_past + n_new
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(n_past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, P+T)
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but past + new tokens "
                f"are {n_past} + {n_new} = {total}; pass a mask over the past and the new tokens"
            )
        allowed = allowed & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def mask_padded_vocab(logits: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """logits (..., V) with every column from n_tokens on set to the dtype's lowest value.

    Columns past the tokenizer's vocabulary are padding rows of the embedding (rounded up to a
    multiple of 64 for faster matmuls): no token has those ids, so they must never be sampled
    nor take probability mass. The lowest finite value rather than -inf: softmax gives them
    exactly 0 all the same, and differences between two masked logits stay finite (0), so
    parity checks against other runtimes and KL divergences never turn NaN.
    """
    if n_tokens >= logits.shape[-1]:
        return logits
    padding = torch.arange(logits.shape[-1], device=logits.device) >= n_tokens  # (V,)
    return logits.masked_fill(padding, torch.finfo(logits.dtype).min)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        # How many rows are real tokens (the rest pads the vocabulary to a multiple of 64);
        # None: all of them. Set from the tokenizer by whoever pairs the two (limit_vocab);
        # deliberately not in GPTConfig, so config.json stays a plain GPT-2 config.
        self.vocab_limit: int | None = None
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def limit_vocab(self, n_tokens: int | None) -> "GPT":
        """Declare that only the first n_tokens rows are tokens (the tokenizer's size); None or
        vocab_size means every row. In eval mode the logits of the other rows are masked
        (`mask_padded_vocab`), so generation, perplexity and exports never pick them. Returns
        the model. Raises ValueError for a count outside 1..vocab_size."""
        rows = self.config.vocab_size
        if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int)
                                     or not 0 < n_tokens <= rows):
            raise ValueError(f"limit_vocab: n_tokens must be an integer in 1..{rows} (the model's "
                             f"vocab_size), got {n_tokens!r}; a tokenizer larger than the embedding "
                             "belongs to another model")
        self.vocab_limit = None if n_tokens is None or n_tokens == rows else n_tokens
        return self

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once); non_embedding drops wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        targets: torch.Tensor | None = None,
    ) -> GPTOutput:
        """A GPTOutput: logits for every position, plus what the flags ask for.

        input_ids: (B, T) token ids; attention_mask: (B, P+T) 1/0 over past and new tokens;
        position_ids: (B, T), default P..P+T-1; past_key_values: per-layer (k, v), (B, nh, P, hs).
        use_cache fills `past_key_values` (the cache after the new tokens); output_hidden_states
        fills `hidden_states`: the embeddings, each block's output, ln_f's output (for the last).
        targets (B, T) (ignored positions -100) fills `loss` with the mean next-token
        cross-entropy, computed chunk by chunk so the full (B, T, V) float logits never exist,
        and leaves `logits` None (training). The loss is computed here rather than by another
        method so that it runs through the module's call: DDP's gradient sync, FSDP's gathers
        and torch.compile all hook that call, and a wrapped model has no other method.
        """
        B, T = input_ids.shape
        n_past = past_key_values[0][0].shape[2] if past_key_values else 0
        if n_past + T > self.config.n_positions:
            raise ValueError(
                f"context of {n_past + T} tokens is longer than the model's {self.config.n_positions} "
                "positions; shorten the input (or evaluate with a sliding window)"
            )
        if position_ids is None:
            position_ids = torch.arange(n_past, n_past + T, device=input_ids.device)[None]
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = F.dropout(x, self.config.dropout, self.training)
        mask = attention_bias(attention_mask, T, n_past, x.dtype)
        hidden = [x] if output_hidden_states else None
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, past_key_values[i] if past_key_values else None, mask)
            presents.append(present)
            if hidden is not None:
                hidden.append(x)
        x = self.transformer.ln_f(x)
        if hidden is not None:
            hidden[-1] = x  # transformers reports the last block after ln_f
        cache = presents if use_cache else None
        if targets is not None:
            loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
            return GPTOutput(None, cache, hidden, loss)
        logits = self.lm_head(x)  # (B, T, V)
        if self.vocab_limit is not None and not self.training:
            # Only what reads predictions is masked; training leaves the padding rows alone:
            # no target points at them (cross-entropy pushes them down anyway), and the fused
            # `targets` loss never builds these logits, so both training losses stay equal.
            logits = mask_padded_vocab(logits, self.vocab_limit)
        return GPTOutput(logits, cache, hidden)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> Iterator[torch.Tensor]:
        """Yield the next tokens (B,) one step at a time, reusing the KV cache, in eval mode.

        The loop and its settings (temperature, top_k, top_p, repetition_penalty, stop_tokens,
        attention_mask for left-padded prompts, generator) are `compactgpt.sampling.stream_tokens`'s,
        shared with the ONNX runtime. Raises ConfigError as it does.
        """
        cache: KVCache | None = None

        def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            nonlocal cache
            out = self(ids, mask, positions, cache, use_cache=True)
            cache = out.past_key_values
            return out.logits[:, -1, :]

        was_training = self.training
        self.eval()
        try:
            yield from stream_tokens(step, input_ids, max_new_tokens, self.config.n_positions, **sampling)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens generated tokens, (B, T + n)."""
        return with_prompt(input_ids, self.stream(input_ids, max_new_tokens, **sampling))


# ---------------------------------------------------------------------------------------
# The training loss: LM head and cross-entropy in one pass over row chunks


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight.T, targets), with the gradients computed in the forward pass,
    chunk by chunk: only one chunk's (rows, V) logits exist at a time, and the backward pass
    just scales the two saved gradients (hidden's and the head weight's). At GPT-2's 50k
    vocabulary the full float logits are the largest tensor of a training step."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, ignore_index: int):
        valid = targets != ignore_index
        n = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            keep = valid[start : start + chunk_rows]
            logits = (h @ weight.t()).float()  # (rows, V); bf16 matmul under autocast
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(keep, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss = loss + ((lse - picked) * keep).sum()
            # d loss / d logits = (softmax - onehot) / n on the rows that count.
            d_logits = torch.exp(logits - lse[:, None])
            d_logits.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
            d_logits = d_logits * (keep[:, None] / n)
            d_logits = d_logits.to(h.dtype) if not torch.is_autocast_enabled(h.device.type) else d_logits
            grad_hidden[start : start + chunk_rows] = (d_logits @ weight).to(hidden.dtype)
            grad_weight += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under logits `hidden` (N, C) @ `weight` (V, C).T,
    equal to F.cross_entropy(F.linear(hidden, weight).float(), targets) in value and
    gradients, without materializing the (N, V) logits. chunk_rows defaults to about 16M
    logits per chunk on a GPU and 4M on a CPU (chunks that fit its caches better)."""
    if chunk_rows is None:
        budget = 1 << 24 if hidden.device.type == "cuda" else 1 << 22
        chunk_rows = max(1, budget // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, ignore_index)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """CompactGPT state dict -> GPT-2 tensor names and layouts (the tied head left out)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the `transformer.` prefix) -> CompactGPT names and layouts.

    Buffers GPT-2 checkpoints may carry (`attn.bias`, `attn.masked_bias`) are dropped: the
    causal mask here comes from scaled_dot_product_attention.
    """
    out = {}
    for name, tensor in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
