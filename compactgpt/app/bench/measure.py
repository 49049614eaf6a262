"""Measuring one artifact: perplexity (and KL divergence from the baseline) through its own
runtime, decode and prefill speed, size, peak memory; a classifier's accuracy and latency."""

from __future__ import annotations

import gc
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch

from ...calibration import data_folder_tokens
from ...data import is_data_folder, random_windows
from ...device import cpu_threads, resolve_device
from ...errors import ConfigError
from ...lineage import same_tokenizer
from ...tokenizer import Tokenizer
from ..open import OpenedModel, open_model
from .config import BenchConfig
from .folders import artifact_kind, artifact_parameters, file_bytes, parameter_count
from .memory import peak_memory
from .timing import device_clock, percentile, time_stream


def eval_token_ids(data: str, tokenizer: Tokenizer | str | Path) -> tuple[torch.Tensor, str]:
    """Tokens to score and where they come from: a prepared data folder's val split, which
    must have been made with `tokenizer` (a tokenizer or a folder holding one). Raises
    ConfigError otherwise."""
    path = Path(data)
    if not is_data_folder(path):
        raise ConfigError(f"--data {data} is not a prepared data folder; create one with `compactgpt tokenize` "
                          "using the models' tokenizer (--tokenizer MODEL)")
    problem = (f"{data} was tokenized with a different tokenizer than the model's; benchmark models against a "
               "data folder made with their own tokenizer")
    return data_folder_tokens(path, tokenizer, "the model", problem=problem), f"val split of {path}"


def open_measured(folder: str | Path, config: BenchConfig) -> OpenedModel:
    """A language-model artifact opened the way bench measures it: PyTorch and quantized
    models on the config's device, ONNX exports on ONNX Runtime's CPU provider, both with
    the config's threads."""
    return open_model(folder, config.threads, resolve_device(config.device))


def measure_classifier(folder: Path, config: BenchConfig) -> dict:
    """A classifier artifact: accuracy and macro F1 on the held-out split its finetuning
    stage used (rebuilt from its manifest), and per-example latency at batch 1."""
    from ...finetune.classify import (classifier_max_length, encode_texts, evaluate_examples, heldout_examples,
                                      load_classifier, predict)

    device = resolve_device(config.device)
    loaded = load_classifier(folder, device=device)  # predict moves each batch there
    settings = loaded.manifest.settings if loaded.manifest else {}
    if settings.get("task") != "classify" or not settings.get("data"):
        raise ConfigError(f"{folder} records no labelled data to hold out from; benchmark classifiers written "
                          "by `compactgpt finetune --task classify`")
    examples, source = heldout_examples(loaded)
    max_length = classifier_max_length(loaded)
    r = evaluate_examples(loaded.model, loaded.tokenizer, examples, loaded.labels, max_length)
    seqs = encode_texts(loaded.tokenizer, [e.text for e in examples[: max(8, config.repeats)]], max_length)
    for seq in seqs[: config.warmup]:
        predict(loaded.model, [seq], loaded.tokenizer.eot_id, batch_size=1)
    clock = device_clock(device)
    latency = []
    for seq in seqs:
        t = clock()
        predict(loaded.model, [seq], loaded.tokenizer.eot_id, batch_size=1)
        latency.append(clock() - t)
    return {"folder": str(folder), "runtime": "pytorch-classifier", "device": str(device),
            "parameters": parameter_count(loaded.model), "file_bytes": file_bytes(folder),
            "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "examples": r["examples"], "eval": {"data": source},
            "latency_ms_median": statistics.median(latency) * 1e3,
            "latency_ms_p90": percentile(latency, 90) * 1e3, "latency_examples": len(latency)}


def measure_speed(model: OpenedModel, tokens: torch.Tensor, config: BenchConfig) -> list[dict]:
    """Streaming speed at each batch size, on prompts of real validation text (so the decode
    path sees ordinary activations) drawn with the config's seed. llama.cpp runs one sequence
    per context (export.llamacpp): a GGUF row is timed at batch 1 only."""
    gen = torch.Generator().manual_seed(config.seed)
    speed = []
    for batch in (1,) if model.kind == "gguf" else config.batches:
        prompt = random_windows(tokens, batch, config.prompt_tokens, gen)
        timing = time_stream(lambda: model.stream(prompt, config.new_tokens), config.warmup, config.repeats,
                             clock=device_clock(model.device))
        speed.append(timing.summary(batch, config.prompt_tokens))
    return speed


def _open_reference(reference: str | Path, model: OpenedModel, config: BenchConfig) -> OpenedModel | None:
    """The baseline opened for KL, or None when it cannot be compared with `model`: a
    classifier, another tokenizer, or a context shorter than the model's scoring window."""
    if artifact_kind(reference) == "classifier":
        return None
    ref = open_measured(reference, config)
    if not same_tokenizer(ref.tokenizer, model.tokenizer) or ref.n_positions < model.n_positions:
        return None
    return ref


def score(folder: Path, model: OpenedModel, tokens: torch.Tensor, config: BenchConfig,
          reference: str | Path | None) -> tuple[SimpleNamespace, dict | None]:
    """(perplexity result, divergence from the reference or None). With a comparable reference
    the perplexity comes from the same pass as the KL divergence."""
    from ...evaluation import compare_models, perplexity

    window = model.n_positions
    itself = reference is not None and Path(reference).resolve() == folder.resolve()
    ref = _open_reference(reference, model, config) if reference is not None and not itself else None
    if ref is None:
        ppl = perplexity(model.logits_fn, tokens, window, config.stride or None, progress=config.progress)
        if itself:
            return ppl, {"reference": str(reference), "kl_mean": 0.0, "kl_median": 0.0, "kl_p99": 0.0,
                         "top1_agreement": 1.0}
        return ppl, None
    c = compare_models(model.logits_fn, ref.logits_fn, tokens, window, config.stride or None,
                       progress=config.progress)
    ppl = SimpleNamespace(perplexity=c.perplexity, nll=math.log(c.perplexity), tokens=c.tokens,
                          max_length=c.max_length, stride=c.stride)
    divergence = {"reference": str(reference), "kl_mean": c.kl_mean, "kl_median": c.kl_median,
                  "kl_p99": c.kl_p99, "top1_agreement": c.top1_agreement}
    del ref
    gc.collect()  # close the reference's runtime now (an ONNX Runtime session's threads spin)
    return ppl, divergence


def measure(folder: str | Path, config: BenchConfig, reference: str | Path | None = None) -> dict:
    """Every figure of one artifact (see the package docstring), with the config's threads.
    With `reference` (the baseline model), perplexity is measured in the same pass as the KL
    divergence of the artifact's next-token distributions from the reference's; models with
    another tokenizer or a shorter context than the artifact's window get no KL. Raises
    ArtifactError for a folder bench cannot measure, ConfigError for settings that do not fit
    the model or its data."""
    folder = Path(folder)
    kind = artifact_kind(folder)
    with cpu_threads(config.threads):
        if kind == "classifier":
            return measure_classifier(folder, config)
        return _measure_language_model(folder, kind, config, reference)


def runtime_missing(kind: str) -> str | None:
    """Why an artifact of this bench kind cannot run on this machine, or None: a GGUF export
    without llama-cpp-python."""
    if kind != "gguf":
        return None
    from export.llamacpp import llama_cpp_missing

    return llama_cpp_missing()


def _measure_language_model(folder: Path, kind: str, config: BenchConfig, reference: str | Path | None) -> dict:
    missing = runtime_missing(kind)
    if missing:  # the row says why it is absent; the others are still measured
        return {"folder": str(folder), "runtime": kind, "absent": missing}
    gc.collect()  # runtimes of earlier measurements must not share the CPU with this one
    model = open_measured(folder, config)
    tokens, source = eval_token_ids(config.data, model.tokenizer)
    if config.eval_tokens:
        tokens = tokens[: config.eval_tokens]
    if config.prompt_tokens + config.new_tokens > model.n_positions:
        raise ConfigError(f"prompt_tokens + new_tokens = {config.prompt_tokens + config.new_tokens} exceeds "
                          f"{folder}'s {model.n_positions} positions; lower them")
    # Speed first: the reference model opened for the KL would share the CPU with it.
    speed = measure_speed(model, tokens, config)
    ppl, divergence = score(folder, model, tokens, config, reference)
    own = parameter_count(model.runner) if kind == "pytorch" else None  # integer codes are not parameters
    if kind == "gguf":
        model.runner.close()  # llama.cpp's threads and caches go now, not at the next collection
    record = {
        "folder": str(folder),
        "runtime": kind,
        "device": str(model.device),
        "parameters": artifact_parameters(folder, own),
        "file_bytes": file_bytes(folder),
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "eval": {"data": source, "tokens": ppl.tokens, "max_length": ppl.max_length, "stride": ppl.stride},
        "speed": speed,
    }
    if divergence is not None:
        record["divergence"] = divergence
    if config.memory:
        record["memory"] = peak_memory(folder, kind, config.threads, config.prompt_tokens, config.new_tokens,
                                       model.device)
    return record
