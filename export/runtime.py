"""Run an exported decoder with ONNX Runtime: KV cache, IO binding, greedy and sampling.

`OnnxDecoder(folder)` checks the folder (file hashes against the manifest, config.json against
the graph: `export.verify`), reads its config.json, tokenizer and model.onnx and feeds the
graph by the names of `export.spec`. The CPU provider is the default; `device="cuda"` uses the
CUDA provider when onnxruntime-gpu sees a GPU and falls back to the CPU with a message when
it does not.

Generation keeps the KV cache in buffers allocated once per generation (`KVCache`), bound to
the graph's past inputs and present outputs by IO binding, so a decode step allocates nothing
that grows with the length: memory stays flat and step time grows only with attention's own
reading of the cache.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from compactgpt.artifacts import check_complete, read_config
from compactgpt.errors import ArtifactError, ConfigError
from compactgpt.sampling import stream_tokens, with_prompt
from compactgpt.tokenizer import Tokenizer

from .kvshare import KV_CACHE_KEY
from .spec import MODEL_FILE, DecoderSpec
from .verify import check_config_matches_graph, verify_export_files

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def is_onnx_folder(folder: str | Path) -> bool:
    """True for a folder holding an exported decoder (model.onnx next to config.json)."""
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() and (folder / "config.json").is_file()


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU device node (the CUDA provider needs one)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or (torch.cuda.is_available())


def resolve_providers(device: str, log: Callable[[str], None]) -> list:
    """Execution providers for a device string, always explicit.

    onnxruntime-gpu lists the CUDA provider even on machines without a GPU, so the list it
    reports cannot be trusted alone: a CUDA request also needs a visible GPU."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log("CUDA was requested but this ONNX Runtime build has no CUDA provider "
                "(install onnxruntime-gpu); running on the CPU")
            return ["CPUExecutionProvider"]
        if not gpu_visible():
            log("CUDA was requested but no GPU is visible; running on the CPU")
            return ["CPUExecutionProvider"]
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class OnnxDecoder:
    """An exported CompactGPT decoder run by ONNX Runtime.

    folder: an export folder (model.onnx, config.json, tokenizer). device: cpu | cuda[:N].
    threads: intra-op threads (default: ONNX Runtime's choice). io_binding: feed the graph
    through IO binding (default on). preallocate: generation writes the KV cache into buffers
    allocated once (`KVCache`; default on, needs io_binding); off, ONNX Runtime allocates a
    new present KV every step (the path before KVCache, kept to compare against). verify:
    check the files' sha256 against the manifest before loading (default on; off only where
    the caller has just verified the folder). config.json is always checked against the graph.
    memory_pattern: ONNX Runtime's memory pattern (default off, see below; on reproduces the
    runtime before KVCache for the soak benchmark).
    Raises ArtifactError when the folder is not a complete, intact export.
    """

    def __init__(self, folder: str | Path, *, device: str = "cpu", threads: int | None = None,
                 io_binding: bool = True, preallocate: bool = True, verify: bool = True,
                 memory_pattern: bool = False, log: Callable[[str], None] = _stderr):
        import onnxruntime as ort

        self.folder = Path(folder)
        check_complete(self.folder)
        if not (self.folder / MODEL_FILE).is_file():
            raise ArtifactError(
                f"{self.folder} has no {MODEL_FILE}: it is not an ONNX export. Create one with "
                f"`compactgpt export --model MODEL --out {self.folder}`"
            )
        if verify:  # before ONNX Runtime parses a byte: a damaged weight loads silently
            verify_export_files(self.folder)
        self.config = read_config(self.folder)
        self.spec = DecoderSpec.from_config(self.config)
        self.tokenizer = Tokenizer.from_folder(self.folder) if (self.folder / "tokenizer.json").is_file() else None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory pattern caches an allocation plan per set of input shapes; every decode
        # step has a new past length, so it only grows (measured: ~2.3 KiB per generated token
        # on the soak model) and never pays off.
        options.enable_mem_pattern = memory_pattern
        # Decode is one small graph call per token: the intra-op threads spin between calls
        # instead of sleeping (measured at 12x768, 2 threads: fp32 13.9 vs 16.1 ms per token
        # with spinning off, int4 4.4 vs 5.6 ms), and the CPU memory arena stays on (no
        # measurable difference either way; it keeps allocations off the OS's allocator).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.enable_cpu_mem_arena = True
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1  # one graph at a time: no parallel branches to run
        options.log_severity_level = 3
        providers = resolve_providers(device, log)
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {self.folder / MODEL_FILE}: {e}") from e
        active = self.session.get_providers()
        self.device_type = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        if device.startswith("cuda") and self.device_type != "cuda" and len(providers) > 1:
            log("the CUDA provider failed to start (see ONNX Runtime's message above); running on the CPU")
        self.device_id = providers[0][1]["device_id"] if self.device_type == "cuda" else 0
        check_config_matches_graph(self.folder, self.config, self.session)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = _ORT_TYPES.get(inputs[self.spec.past_key(0)].type, np.float32)
        # A graph exported with --kv-cache shared writes new keys and values into its past buffer.
        meta = self.session.get_modelmeta().custom_metadata_map
        self.shared_kv = meta.get(KV_CACHE_KEY) == "shared"
        self.io_binding = io_binding
        self.preallocate = preallocate and io_binding

    # -- one call of the graph ------------------------------------------------------------
    def empty_past(self, batch: int) -> list:
        """The KV cache of `batch` rows before any token: zero-length past per layer."""
        shape = (batch, self.spec.n_head, 0, self.spec.head_dim)
        return [self._ortvalue(np.zeros(shape, self.dtype)) for _ in self.spec.past_names]

    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        if not self.io_binding:
            return array
        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list | None = None) -> tuple[np.ndarray, list]:
        """One call: logits (B, T, V) as float32 numpy, and the present KV (opaque values to
        pass back as `past`). past None means an empty cache."""
        spec = self.spec
        B = input_ids.shape[0]
        past = past if past is not None else self.empty_past(B)
        feeds = {spec.input_ids: np.ascontiguousarray(input_ids, dtype=np.int64),
                 spec.attention_mask: np.ascontiguousarray(attention_mask, dtype=np.int64),
                 spec.position_ids: np.ascontiguousarray(position_ids, dtype=np.int64)}
        if not self.io_binding:
            feeds.update(zip(spec.past_names, past))
            # Asked for by name: the outputs come back in the spec's order, whatever the graph's.
            outs = self.session.run(spec.output_names, feeds)
            return outs[0].astype(np.float32, copy=False), outs[1:]
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(spec.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(spec.logits, "cpu")
        for name in spec.present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy().astype(np.float32, copy=False), list(outs[1:])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of whole sequences with no cache (for perplexity)."""
        ids = input_ids.cpu().numpy()
        B, T = ids.shape
        if T > self.config.n_positions:
            raise ConfigError(f"{T} tokens exceed the model's {self.config.n_positions} positions")
        out, _ = self.forward(ids, np.ones((B, T), np.int64), np.tile(np.arange(T), (B, 1)))
        return torch.from_numpy(out)

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A logits function for `compactgpt.evaluation.perplexity`."""
        return self.logits

    # -- generation -------------------------------------------------------------------------
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, *,
               attention_mask: torch.Tensor | None = None, **sampling) -> Iterator[torch.Tensor]:
        """Yield the next tokens (B,) step by step: `compactgpt.sampling.stream_tokens`, the loop
        and settings `GPT.stream` runs too, over this graph and its KV cache.

        Raises ConfigError as that loop does, and for left-padded rows on a graph with a
        shared KV cache."""
        input_ids = torch.as_tensor(input_ids)
        if self.shared_kv and attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise ConfigError(f"{self.folder} has a shared KV cache (exported with --kv-cache shared), which reads each "
                              "row's tokens from its start: it cannot run left-padded rows; generate them one by one, "
                              "or use an export with --kv-cache copy")
        call = None

        def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            nonlocal call
            if call is None:  # created at the prefill, once the loop has checked the lengths
                B, T = ids.shape
                call = self.new_cache(B, T + max_new_tokens).run if self.preallocate else self._per_step_cache()
            new_mask = None if mask is None else mask[:, -ids.shape[1]:].numpy()
            return torch.from_numpy(call(ids.numpy(), positions.numpy(), new_mask)[:, -1, :])

        yield from stream_tokens(step, input_ids, max_new_tokens, self.config.n_positions,
                                 attention_mask=attention_mask, **sampling)

    def new_cache(self, batch: int, capacity: int) -> "KVCache":
        """An empty KV cache for `batch` rows and up to `capacity` tokens (see KVCache; one
        buffer per KV tensor for a graph with a shared KV cache)."""
        return KVCache(self, batch, capacity, shared=self.shared_kv)

    def _per_step_cache(self) -> Callable[..., np.ndarray]:
        """KVCache.run's contract over `forward`: ONNX Runtime allocates a new present KV each
        call, one token longer (preallocate=False; the soak benchmark's baseline)."""
        state: dict = {"past": None, "mask": None}

        def call(input_ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
            new = np.ones(input_ids.shape, np.int64) if mask is None else mask.astype(np.int64)
            state["mask"] = new if state["mask"] is None else np.concatenate([state["mask"], new], axis=1)
            logits, state["past"] = self.forward(input_ids, state["mask"], position_ids, state["past"])
            return logits
        return call

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens generated tokens, (B, T + n)."""
        input_ids = torch.as_tensor(input_ids)
        return with_prompt(input_ids, self.stream(input_ids, max_new_tokens, **sampling))


class KVCache:
    """The KV cache of one generation: allocated once, then filled call by call.

    The graph computes present = concat(past, new), a dense (B, nh, P+T, hs) tensor, from a
    dense (B, nh, P, hs) past. The two can be prefixes of one buffer only when B * nh == 1 (the
    head axis's stride changes with P), and ONNX Runtime copies past into present head by head
    while reading it, so binding both to the same memory corrupts the cache (measured on the
    fused and unfused graphs at batch 2: logits off by 5 to 1e31). Instead each KV tensor has
    two buffers of the full capacity, bound by IO binding: the graph reads past from one and
    writes present into the other, and they swap roles after every call. Each call binds
    prefixes of the same memory and a decode step's logits go into one reused array, so
    nothing is allocated that grows with the length; the copy of past into present reads what
    attention reads anyway. Memory: 2 x the KV cache at `capacity`, committed when the cache is
    created (on the CPU), so it stays flat while tokens are generated.
    """

    def __init__(self, decoder: OnnxDecoder, batch: int, capacity: int, shared: bool = False):
        import onnxruntime as ort

        spec = decoder.spec
        self.decoder, self.batch, self.capacity, self.shared = decoder, batch, capacity, shared
        self.length = 0  # tokens cached so far
        shape = [batch, spec.n_head, capacity, spec.head_dim]
        where = (decoder.device_type, decoder.device_id)
        # One pair per past/present name, in spec order; shared: one buffer bound as both (the
        # graph appends in place), so the cache costs 1x its size, not 2x. On the CPU the buffers
        # are numpy arrays written once here, so their pages are committed now: resident memory
        # then stays flat through the generation instead of growing page by page as it fills.
        per_name = 1 if shared else 2
        count = per_name * len(spec.past_names)
        self._arrays = []
        if decoder.device_type == "cpu":
            for _ in range(count):
                array = np.empty(shape, decoder.dtype)
                array.fill(0)
                self._arrays.append(array)
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
        else:
            values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.dtype, *where) for _ in range(count)]
        self.buffers = [(values[per_name * i], values[per_name * i + per_name - 1]) for i in range(len(spec.past_names))]
        self._past = 0  # which buffer of each pair holds the past
        self.mask = np.zeros((batch, capacity), np.int64)
        self._step_logits = np.empty((batch, 1, spec.vocab_size), decoder.dtype)
        self.binding = decoder.session.io_binding()

    def pointers(self) -> set[int]:
        """Data pointers of the KV buffers: the only memory the graph's KV is ever bound to."""
        return {value.data_ptr() for pair in self.buffers for value in pair}

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """One call of the graph on T new tokens (B, T) after the cached ones; mask (B, T) of
        the new tokens (None: all real). Returns logits (B, T, V) float32, valid until the next
        call (a decode step's array is reused). Raises ConfigError past the capacity."""
        d, spec, bind = self.decoder, self.decoder.spec, self.binding
        B, T = input_ids.shape
        P = self.length
        if B != self.batch or P + T > self.capacity:
            raise ConfigError(f"{P} cached + {T} new tokens in {B} rows do not fit a KV cache of "
                              f"{self.capacity} tokens in {self.batch} rows; create a larger one")
        self.mask[:, P:P + T] = 1 if mask is None else mask
        bind.bind_cpu_input(spec.input_ids, np.ascontiguousarray(input_ids, dtype=np.int64))
        bind.bind_cpu_input(spec.attention_mask, np.ascontiguousarray(self.mask[:, :P + T]))
        bind.bind_cpu_input(spec.position_ids, np.ascontiguousarray(position_ids, dtype=np.int64))
        past_shape, present_shape = [B, spec.n_head, P, spec.head_dim], [B, spec.n_head, P + T, spec.head_dim]
        if self.shared:  # one buffer of the full capacity; the attention mask gives the valid length
            past_shape = present_shape = [B, spec.n_head, self.capacity, spec.head_dim]
        for past_name, present_name, pair in zip(spec.past_names, spec.present_names, self.buffers):
            past, present = pair[self._past], pair[1 - self._past]
            bind.bind_input(past_name, d.device_type, d.device_id, d.dtype, past_shape, past.data_ptr())
            bind.bind_output(present_name, d.device_type, d.device_id, d.dtype, present_shape, present.data_ptr())
        logits = self._step_logits if T == 1 else np.empty((B, T, spec.vocab_size), d.dtype)
        bind.bind_output(spec.logits, "cpu", 0, d.dtype, list(logits.shape), logits.ctypes.data)
        d.session.run_with_iobinding(bind)
        self.length, self._past = P + T, 1 - self._past
        return logits.astype(np.float32, copy=False)


def open_decoder(folder: str | Path, threads: int | None = None, device: str = "cpu",
                 verify: bool = True) -> tuple[OnnxDecoder, Tokenizer]:
    """(decoder, tokenizer) of an export folder, for streaming generation.

    device: cpu | cuda[:N]; threads: ONNX Runtime intra-op threads (None: its own choice);
    verify: check the files' sha256 against the manifest (see OnnxDecoder).
    Raises ArtifactError when the folder is not a complete, intact export or lacks its tokenizer."""
    decoder = OnnxDecoder(folder, device=device or "cpu", threads=threads, verify=verify)
    if decoder.tokenizer is None:
        raise ArtifactError(f"{folder} has no tokenizer.json; re-export it with `compactgpt export`")
    return decoder, decoder.tokenizer
