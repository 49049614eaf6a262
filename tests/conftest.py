"""Shared fixtures: a small corpus written on the spot and tiny random models, so the suite
runs in minutes on two CPU cores with no download."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from compactgpt.data import DataConfig, prepare_data
from compactgpt.model import GPT, GPTConfig
from compactgpt.tokenizer import Tokenizer, train_bpe

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_WORDS = ("def", "return", "self", "value", "index", "items", "name", "result", "data", "count",
          "for", "in", "if", "else", "while", "None", "True", "False", "import", "class")


def make_program(rng: random.Random, n_funcs: int) -> str:
    """A small Python-looking file: repetitive enough for a tiny model to learn quickly."""
    lines = []
    for i in range(n_funcs):
        a, b = rng.sample(_WORDS[4:10], 2)
        lines.append(f"def {a}_{i}(self, {b}):")
        for _ in range(rng.randint(1, 4)):
            c, d = rng.sample(_WORDS[4:10], 2)
            lines.append(f"    {c} = self.{d} + {rng.randint(0, 9)}")
        lines.append(f"    return {b}\n")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of 40 small Python-like files (about 100 KB)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (root / f"module_{i:02d}.py").write_text(make_program(rng, 30))
    return root


@pytest.fixture(scope="session")
def data_dir(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data(DataConfig(source=str(corpus_dir), vocab_size=300, val_fraction=0.1, out=str(out)), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tokenizer(data_dir) -> Tokenizer:
    return Tokenizer.from_folder(data_dir)


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPTConfig(**{**base, **overrides})


def random_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    # Non-trivial LayerNorm gains and biases, so parity tests exercise every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def talkative_gpt(seed: int = 0) -> GPT:
    """random_gpt with its ln_f bias removed and large position embeddings: its greedy tokens
    change at every position (random_gpt's repeat one token, which a KV-cache or position bug
    in a runtime would still reproduce)."""
    model = random_gpt(seed)
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()
        model.transformer.wpe.weight.mul_(30)
    return model


@pytest.fixture
def byte_tokenizer() -> Tokenizer:
    """A tokenizer trained on a few lines: enough for artifact round trips."""
    return train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)


def winning_padding(model: GPT, n_tokens: int) -> GPT:
    """Make the logits of the embedding rows past n_tokens (vocabulary padding) the largest
    at every position: a constant feature out of ln_f (its bias) read only by those rows. A
    model whose padding is not masked then generates nothing but padding ids."""
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 20.0
        model.transformer.wte.weight[n_tokens:] = 0.0
        model.transformer.wte.weight[n_tokens:, 0] = 50.0
    return model
