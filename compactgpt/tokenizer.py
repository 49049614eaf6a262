"""Byte-level BPE tokenizers: trained here with Hugging Face `tokenizers`, or GPT-2's own.

A model folder holds `tokenizer.json` plus the two small files transformers reads
(`tokenizer_config.json`, `special_tokens_map.json`), so `AutoTokenizer.from_pretrained`
and Optimum load the same tokenizer CompactGPT uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import ArtifactError, DataError
from .io import atomic_write_text

EOT = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the document separator `<|endoftext|>`."""

    def __init__(self, tok: HFTokenizer):
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise ArtifactError(
                f"tokenizer has no {EOT} token; CompactGPT needs it as the document separator. "
                f"Retrain the tokenizer (compactgpt tokenize) or add {EOT} as a special token"
            )
        self._tok = tok
        self.eot_id = eot

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and the transformers side files, each atomically."""
        folder = Path(folder)
        atomic_write_text(folder / "tokenizer.json", self.to_json())
        config = {
            "tokenizer_class": "GPT2TokenizerFast",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "add_prefix_space": False,
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Load tokenizer.json, or GPT-2's vocab.json + merges.txt, from a folder."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            try:
                return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")))
            except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
                raise ArtifactError(
                    f"{folder / 'tokenizer.json'} could not be read ({e}); the file is damaged: "
                    "copy it again from the folder that produced it"
                ) from e
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            tok = HFTokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            if tok.token_to_id(EOT) is not None:
                tok.add_special_tokens([EOT])
            return cls(tok)
        raise ArtifactError(
            f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt. "
            "Copy the tokenizer files into the folder, or train one with `compactgpt tokenize`"
        )


def train_bpe(texts: Iterator[str] | list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on the given documents. The 256 byte symbols are always in the
    vocabulary, so any text encodes; `<|endoftext|>` is added as a special token."""
    if vocab_size < 257 + 1:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte symbols plus "
            f"{EOT}; use at least 258 (typical: 4096 to 50257)"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
