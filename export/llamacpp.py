"""Running a GGUF export in llama.cpp, through its Python binding (llama-cpp-python), behind the
same two functions as every other runtime: logits over whole windows (perplexity, KL) and a
step for `compactgpt.sampling.stream_tokens` (generation, speed), so llama.cpp's rows of a
benchmark are scored on the same tokens and sample with the same code as ONNX Runtime's.

llama.cpp only computes; the tokens come from CompactGPT's tokenizer (the GGUF holds the same
vocabulary, and llama.cpp's own tokenization of it is checked by the tests). One context runs
one sequence here, so generation takes one prompt at a time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from compactgpt.artifacts import check_complete, read_config
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.sampling import Step, stream_tokens, with_prompt
from compactgpt.tokenizer import Tokenizer

from .gguf import GGUF_FILE

INSTALL_HINT = "pip install -e '.[llamacpp]' (llama-cpp-python; pip compiles llama.cpp in a few minutes)"


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here, or None: its Python binding is not installed, or is but
    its compiled library does not load on this machine (OSError / RuntimeError from ctypes)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"llama-cpp-python is installed but its llama.cpp library does not load ({reason}): reinstall it, {INSTALL_HINT}"
    return None


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as llama.cpp's CPU backend computes it (GGML_GELU_FP16, set in its source): the input
    rounded to fp16 and looked up in a table of fp16 results; the identity from 10, 0 below -10.
    The one op where its arithmetic differs from PyTorch's beyond float32 rounding: tests and
    benchmarks put it in a PyTorch model to compare the rest exactly."""
    table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def padded_logits(logits: np.ndarray, vocab_size: int) -> torch.Tensor:
    """llama.cpp's logits (..., tokenizer vocabulary) widened to `vocab_size` (the model's
    embedding rows) with the padding columns at the lowest float, as PyTorch and ONNX Runtime
    mask them (`compactgpt.model.mask_padded_vocab`): every runtime's rows have the same width."""
    out = torch.from_numpy(np.array(logits, dtype=np.float32))
    pad = vocab_size - out.shape[-1]
    if pad <= 0:
        return out
    return torch.cat([out, out.new_full((*out.shape[:-1], pad), torch.finfo(torch.float32).min)], dim=-1)


def llama_step(llm, vocab_size: int) -> Step:
    """A `compactgpt.sampling.Step` over one llama_cpp.Llama context (one sequence, no padding):
    the new ids appended to its KV cache, or a fresh cache when they start at position 0, and the
    last position's logits widened to `vocab_size` (`padded_logits`)."""
    import llama_cpp

    n_vocab = llm.n_vocab()

    def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if int(positions[0, 0]) == 0:
            llm.reset()  # a new prompt: the cache from the last one is dropped by eval
        llm.eval(ids[0].tolist())
        # The binding keeps no logits without logits_all: the last row is read from llama.cpp.
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return padded_logits(last, vocab_size)[None]

    return step


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log from C, past Python's sys.stderr (verbose=False silences
    most of it, not the backend's lines): the process's stderr is pointed at /dev/null while
    a model loads, so a user's terminal shows CompactGPT's lines only."""
    try:
        fd = os.dup(2)
    except OSError:  # no stderr to redirect (a daemon)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class LlamaCppDecoder:
    """A GGUF export folder (model.gguf, config.json, tokenizer) run by llama.cpp on the CPU.

    threads: llama.cpp's threads for prompt and decode (default: this process's CPU threads).
    verify: check every file's sha256 against the manifest first (default on).
    Raises ConfigError when llama-cpp-python is missing, ArtifactError for a folder that is not
    a complete, intact GGUF export or a file llama.cpp cannot load."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, verify: bool = True):
        missing = llama_cpp_missing()
        if missing:
            raise ConfigError(f"{folder} is a GGUF export, run by llama.cpp, but {missing}")
        self.folder = Path(folder)
        check_complete(self.folder)
        if not (self.folder / GGUF_FILE).is_file():
            raise ArtifactError(f"{self.folder} has no {GGUF_FILE}: create one with "
                                f"`compactgpt export --model MODEL --out {self.folder} --format gguf`")
        if verify:
            from .verify import verify_export_files

            verify_export_files(self.folder)
        self.config = read_config(self.folder)
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.threads = threads or torch.get_num_threads()
        # One context per use, opened when first needed: scoring asks llama.cpp for the logits
        # of every position, generation for the last one only (computing the head over a whole
        # prompt would slow every prefill it times).
        self._contexts: dict[bool, object] = {}

    def _context(self, every_position: bool):
        if every_position not in self._contexts:
            from llama_cpp import Llama

            n = self.config.n_positions
            try:
                with _quiet_stderr():
                    self._contexts[every_position] = Llama(
                        model_path=str(self.folder / GGUF_FILE), n_ctx=n, n_batch=n, n_ubatch=n,
                        n_threads=self.threads, n_threads_batch=self.threads, logits_all=every_position,
                        verbose=False)
            except (ValueError, RuntimeError) as e:  # the binding's words for a file llama.cpp refused
                raise ArtifactError(f"llama.cpp cannot load {self.folder / GGUF_FILE} ({e}); export it again "
                                    "with `compactgpt export --format gguf`") from e
        return self._contexts[every_position]

    def close(self) -> None:
        """Free llama.cpp's contexts (its threads and KV caches) now rather than at collection."""
        for llm in self._contexts.values():
            llm.close()
        self._contexts.clear()

    # -- scoring ------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of whole sequences, each row from an empty cache."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ConfigError(f"{T} tokens exceed the model's {self.config.n_positions} positions")
        llm = self._context(every_position=True)
        rows = []
        for row in input_ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(padded_logits(llm.scores[:T], self.config.vocab_size))
        return torch.stack(rows)

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A logits function for `compactgpt.evaluation.perplexity`."""
        return self.logits

    # -- generation -------------------------------------------------------------------------
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, *,
               attention_mask: torch.Tensor | None = None, **sampling) -> Iterator[torch.Tensor]:
        """Yield the next tokens (1,) step by step: `compactgpt.sampling.stream_tokens` over
        llama.cpp's KV cache. Raises ConfigError for more than one prompt, and as that loop does."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.shape[0] != 1:
            raise ConfigError(f"llama.cpp runs one sequence per context here; got {input_ids.shape[0]} prompts: "
                              "generate them one at a time, or use the ONNX export for batches")
        step = llama_step(self._context(every_position=False), self.config.vocab_size)
        yield from stream_tokens(step, input_ids, max_new_tokens, self.config.n_positions,
                                 attention_mask=attention_mask, **sampling)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens generated tokens, (1, T + n)."""
        input_ids = torch.as_tensor(input_ids)
        return with_prompt(input_ids, self.stream(input_ids, max_new_tokens, **sampling))
