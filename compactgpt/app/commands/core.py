"""Verbs on the core and the pretraining stage: tokenize, pretrain, eval, generate, info."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--device for a verb that runs a PyTorch model; `what` says what runs there."""
    from ...device import DEVICE_HELP

    p.add_argument("--device", default="auto", help=f"where {what} runs: {DEVICE_HELP} (default auto)")


# ---------------------------------------------------------------------------------------
# tokenize


def add_tokenize_args(p: argparse.ArgumentParser) -> None:
    from ...config import add_config_args, field_help
    from ...data import DataConfig

    p.description = ("Read a corpus, split it by document into train/validation, train a byte-level BPE "
                     "tokenizer and write token shards to a data folder.")
    # The source is --data on every verb, and a data folder is always named: the field keeps
    # the name saved in data manifests (source), and --out is required here.
    p.add_argument("--data", dest="source", metavar="DATA",
                   help=f"{field_help(DataConfig, 'source')} (default {DataConfig.source})")
    p.add_argument("--out", required=True, help=field_help(DataConfig, "out"))
    add_config_args(p, DataConfig, skip=("source", "out"), show_defaults=True)


def run_tokenize(args) -> None:
    from ...artifacts import read_manifest
    from ...config import given_args
    from ...data import DataConfig, prepare_data

    out = prepare_data(DataConfig(**given_args(args, DataConfig)), log=_log)
    m = read_manifest(out).metrics
    packages = f", {m['packages']:,} packages" if m.get("packages") else ""
    print(f"wrote {out}: {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens from "
          f"{m['documents']:,} documents ({m['files']:,} files{packages}, {m.get('duplicates', 0):,} duplicates "
          f"removed); vocabulary {m['vocab_size']:,}; unigram val perplexity {m['unigram_val_perplexity']:.1f}; "
          f"{m.get('seconds', 0):.1f} s, peak memory {m.get('peak_memory_mb', 0):,.0f} MB")


# ---------------------------------------------------------------------------------------
# pretrain


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    from ...config import add_config_args
    from ...pretrain import PRESETS, TrainConfig

    p.description = ("Pretrain a GPT-2-architecture model. Runs on CUDA (bf16) when a GPU is visible, else on "
                     f"CPU in float32. Launch with torchrun for several processes. Presets: {', '.join(PRESETS)}; "
                     "a flag given overrides the preset's value.")
    add_config_args(p, TrainConfig)


def run_pretrain(args) -> None:
    from ...config import RUN_SETTINGS, given_args
    from ...pretrain import TrainConfig, config_from_preset
    from ...training import find_checkpoint

    given = given_args(args, TrainConfig)
    out = Path(given.get("out", TrainConfig.out))
    # find_checkpoint: also one a save cut short left as checkpoint.tmp / .old (resuming moves it back).
    checkpoint = find_checkpoint(out)
    saved_settings = checkpoint / "settings.json" if checkpoint is not None else None
    if given.get("resume") and saved_settings is not None and saved_settings.is_file():
        # Resume from files alone: the checkpoint's settings, with the flags given now on top;
        # how the earlier run went (its threads, its progress bar) is not carried over.
        base = {k: v for k, v in json.loads(saved_settings.read_text()).items() if k not in RUN_SETTINGS}
        preset = given.pop("preset", base.pop("preset"))
        base.pop("preset", None)
        config = config_from_preset(preset, **{**base, **given})
    else:
        preset = given.pop("preset", "small")
        config = config_from_preset(preset, **given)
    from ...pretrain import pretrain

    print(pretrain(config, log=_log))


# ---------------------------------------------------------------------------------------
# eval


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Perplexity by the fixed-length sliding-window method, for a float, quantized, ONNX or GGUF model "
                     "folder. Without --data, the model's own held-out validation split is used. With --reference "
                     "(the model it was compressed from), also the KL divergence of its next-token distributions "
                     "from the reference's and how often both rank the same token first: a finer measure of what "
                     "compression cost than a perplexity difference, which can be smaller than its own noise.")
    p.add_argument("--model", required=True, help="model folder: float, quantized, ONNX, or GGUF (run in llama.cpp "
                   "through llama-cpp-python)")
    p.add_argument("--reference", help="model folder to compare with (same tokenizer), e.g. the fp32 teacher")
    p.add_argument("--data", help="text file, folder, glob, JSONL file or prepared data folder (its val split)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    from ...config import positive_int, threads

    # Given flags are checked at parse time: 0 is an error, never a silent "use the default".
    p.add_argument("--max-length", type=positive_int, help="window length (default: the model's n_positions)")
    p.add_argument("--stride", type=positive_int, help="step between windows, at most --max-length "
                   "(default: max-length / 2)")
    add_device_arg(p, "a PyTorch or quantized model (and --reference) "
                      "(an ONNX export runs on ONNX Runtime's CPU provider)")
    p.add_argument("--threads", type=threads, help="CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_eval(args) -> None:
    import torch

    from ...device import resolve_device
    from ...errors import ConfigError
    from ...evaluation import compare_models, perplexity
    from ...calibration import heldout_tokens
    from ...lineage import same_tokenizer
    from ..open import open_for_scoring
    from .finetune import eval_finetuned

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # a device this machine lacks is refused before any work
    # A classifier's accuracy, an instruction model's held-out response perplexity:
    if eval_finetuned(args, device):
        return
    model = open_for_scoring(args.model, args.threads, device)
    tokens, source = heldout_tokens(model.folder, model.manifest, model.tokenizer, args.data, args.text_field)
    n_positions = model.n_positions
    max_length = args.max_length or n_positions
    reference = None
    if args.reference:
        reference = open_for_scoring(args.reference, args.threads, device)
        if not same_tokenizer(reference.tokenizer, model.tokenizer):
            raise ConfigError(
                f"{args.reference} has a different tokenizer than {args.model}: their next-token "
                "distributions cannot be compared; give the model it was compressed from as --reference"
            )
        n_positions = min(n_positions, reference.n_positions)
    if max_length > n_positions:
        holder = "the model's" if reference is None else "the two models'"
        raise ConfigError(
            f"--max-length {max_length} is longer than {holder} {n_positions} positions; use --max-length {n_positions} or less"
        )
    progress = not args.json
    if reference is None:
        result = perplexity(model.logits_fn, tokens, max_length, args.stride, progress=progress)
        record = {"model": str(args.model), "data": source, **result.to_dict()}
        summary = (f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f}) over {result.tokens:,} tokens "
                   f"of {source}; windows of {result.max_length}, stride {result.stride}")
    else:
        result = compare_models(model.logits_fn, reference.logits_fn, tokens, max_length, args.stride,
                                progress=progress)
        record = {"model": str(args.model), "reference": str(args.reference), "data": source, **result.to_dict()}
        delta = 100 * (result.perplexity / result.reference_perplexity - 1)
        summary = (f"perplexity {result.perplexity:.4f} vs reference {result.reference_perplexity:.4f} "
                   f"({delta:+.2f}%)\nKL(reference || model) per token: mean {result.kl_mean:.5f} nats, "
                   f"median {result.kl_median:.5f}, p99 {result.kl_p99:.5f}; same top-1 token "
                   f"{100 * result.top1_agreement:.2f}%\nover {result.tokens:,} tokens of {source}; windows of "
                   f"{result.max_length}, stride {result.stride}")
    print(json.dumps(record, indent=2) if args.json else summary)


# ---------------------------------------------------------------------------------------
# generate


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Stream a continuation of a prompt. Temperature 0 is greedy decoding. With several models "
                     "(--model repeated, or a report folder) each continues the same prompt, one after the other.")
    p.add_argument("--model", required=True, action="append",
                   help="model folder; repeat it to compare models on one prompt; a report folder (`compactgpt "
                        "bench` / `pipeline`) stands for its baseline and headline models")
    p.add_argument("--prompt", default="", help="prompt text (default: start a new document)")
    from ...config import non_negative_float, non_negative_int, positive_int, probability, seed, threads

    # 0 new tokens is refused like a negative count: asking to generate nothing is a mistake,
    # and printing the prompt back with exit status 0 would hide it.
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate, 1 or more "
                   "(default 100)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=50,
                   help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=probability, default=0.95,
                   help="nucleus sampling threshold in (0, 1] (default 0.95; 1 = off)")
    p.add_argument("--repetition-penalty", type=non_negative_float, default=1.0,
                   help="lower the scores of tokens already in the text, as transformers does: a positive logit "
                        "divided by it, a negative one multiplied (default 1 = off; above 1 discourages loops)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    add_device_arg(p, "a PyTorch or quantized model")
    p.add_argument("--threads", type=threads, help="CPU threads")


def generation_models(models: list[str]) -> list[tuple[str, str]]:
    """(label, folder) of each --model given: a report folder stands for its baseline and headline."""
    from ..report import headline_folders

    here = Path.cwd()
    out = []
    for model in models:
        if (Path(model) / "report.json").is_file():
            out += [(name, str(folder.relative_to(here) if folder.is_relative_to(here) else folder))
                    for name, folder in headline_folders(model).items()]
        else:
            out.append((Path(model).name, model))
    return out


def run_generate(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = generation_models(args.model)
    for i, (label, folder) in enumerate(models):
        if len(models) > 1:  # a header per model, a blank line between them
            print(("\n" if i else "") + f"== {label} ({folder})", flush=True)
        _generate_one(folder, args)


def _generate_one(model_folder: str, args) -> None:
    """Stream one model's continuation of args.prompt to stdout."""
    import torch

    from compactgpt.finetune import prompt_for_generation

    from ...device import device_of
    from ..open import open_for_streaming

    model, tok, folder = open_for_streaming(model_folder, args.threads, args.device)
    # A PyTorch model samples where it runs: the prompt and the sampling generator go there.
    # An ONNX decoder takes CPU ids and samples on the CPU.
    device = device_of(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    # An instruction-tuned model reads the prompt inside the template it was trained with.
    text = prompt_for_generation(folder, args.prompt)
    ids = tok.encode(text) if text else [tok.eot_id]
    stream = model.stream(
        torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        generator=torch.Generator(device).manual_seed(args.seed), stop_tokens=() if args.no_stop else (tok.eot_id,),
    )
    sys.stdout.write(args.prompt if text == args.prompt else "")  # a templated prompt is not echoed
    new: list[int] = []
    shown = ""
    for token in stream:
        t = int(token[0])
        if t == tok.eot_id and not args.no_stop:
            break
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")


# ---------------------------------------------------------------------------------------
# info


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Print what an artifact is: stage, settings, parent, metrics, versions; for a report "
                     "folder (`compactgpt bench` / `pipeline`), its headline and the models it names.")
    p.add_argument("folder", help="artifact or report folder")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")


def _print_report_headline(folder: Path) -> None:
    from ..report import headline_text, load_report

    report = load_report(folder / "report.json")
    print(f"{folder}: a benchmark report ({folder / 'report.md'})\n  {headline_text(report)}")
    for name, model in generation_models([str(folder)]):
        print(f"  {name}: {model}")


def run_info(args) -> None:
    from ...artifacts import read_config, read_manifest
    from ...errors import ArtifactError

    folder = Path(args.folder)
    if (folder / "report.json").is_file() and not args.json:
        _print_report_headline(folder)
        return
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / "config.json").is_file():
            print(f"{folder}: a GPT-2 folder without a CompactGPT manifest\n  {read_config(folder)}")
            return
        raise ArtifactError(f"{folder} is not an artifact: it has neither manifest.json nor config.json")
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return
    print(f"{folder}\n  stage:    {manifest.stage}\n  created:  {manifest.created}")
    if manifest.parent:
        print(f"  parent:   {manifest.parent['path']} (sha256 {manifest.parent['sha256'][:12]})")
    print("  metrics:")
    for k, v in manifest.metrics.items():
        print(f"    {k}: {v:.6g}" if isinstance(v, float) else f"    {k}: {v}")
    print("  settings:")
    for k, v in manifest.settings.items():
        print(f"    {k}: {v}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    print(f"  files:    {', '.join(manifest.files)}")
