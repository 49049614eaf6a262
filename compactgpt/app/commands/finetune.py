"""`compactgpt finetune` and `compactgpt classify`, and the part of `compactgpt eval` that
judges finetuned artifacts perplexity on plain text does not describe (a classifier's
accuracy, an instruction model's held-out response perplexity). The figures come from the
finetune stage; this module reads flags and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...artifacts import is_classifier, read_manifest, resolve_model_path
from ...config import add_config_args, field_help, given_args, threads
from ...device import DEVICE_HELP, resolve_device
from ...errors import ConfigError, DataError
from ...finetune import (TASKS, FinetuneConfig, classify_texts, evaluate_classifier, evaluate_instruct, finetune,
                         format_confusion, is_instruction_model, load_classifier)

FINETUNE_DESCRIPTION = (
    "Finetune a model folder and write a new one whose manifest names the parent and the task. "
    "Tasks: lm (continued pretraining on domain text; perplexity on the domain's and the original "
    "held-out text, before and after), instruct (Alpaca-style JSON with instruction/input/output; "
    "loss on the response only; the prompt template is stored and reused by `generate`), classify "
    "(TSV/CSV/JSONL of text and label; a head on the last real token; accuracy and confusion matrix). "
    "--lora-rank trains low-rank adapters with the base frozen and merges them on save."
)

# Flags every run needs, added first and required; the rest come from FinetuneConfig's fields.
_REQUIRED = ("model", "task", "data", "out")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """The flags of `compactgpt finetune`: FinetuneConfig's fields (help text from the fields)
    and --json."""
    p.description = FINETUNE_DESCRIPTION
    for name in _REQUIRED:
        extra = {"choices": sorted(TASKS)} if name == "task" else {}
        p.add_argument(f"--{name}", required=True, help=field_help(FinetuneConfig, name), **extra)
    add_config_args(p, FinetuneConfig, skip=_REQUIRED, show_defaults=True)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run_finetune(args: argparse.Namespace) -> None:
    """Run the stage; print the metrics as JSON (--json) or the folder written."""
    config = FinetuneConfig(**given_args(args, FinetuneConfig))
    out = finetune(config, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(read_manifest(out).metrics, indent=2))
    else:
        print(out)


def add_classify_args(p: argparse.ArgumentParser) -> None:
    """The flags of `compactgpt classify`."""
    p.description = "Print the predicted label (and probabilities with --json) of each text."
    p.add_argument("--model", required=True, help="classifier folder (compactgpt finetune --task classify)")
    p.add_argument("--text", action="append", default=[], help="text to classify (repeat for several)")
    p.add_argument("--file", help="classify every non-empty line of this file")
    p.add_argument("--json", action="store_true", help="print JSON lines with label and probabilities")
    p.add_argument("--device", default="auto", help=f"where the classifier runs: {DEVICE_HELP} (default auto)")
    p.add_argument("--threads", type=threads, help="CPU threads")


def run_classify(args: argparse.Namespace) -> None:
    """Print label, probability and text per line (JSON lines with --json)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # a device this machine lacks is refused before any work
    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise DataError(f"--file {path} does not exist")
        texts += [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not texts:
        raise ConfigError("nothing to classify: pass --text TEXT (repeatable) or --file FILE")
    loaded = load_classifier(resolve_model_path(args.model), device=device)  # predict moves the ids there
    for text, result in zip(texts, classify_texts(loaded, texts)):
        if args.json:
            print(json.dumps({"text": text, **result}))
        else:
            p = result["probabilities"][result["label"]]
            print(f"{result['label']}\t{p:.3f}\t{text}")


def eval_finetuned(args: argparse.Namespace, device: torch.device | str = "cpu") -> bool:
    """`compactgpt eval` for artifacts that perplexity on plain text does not describe: a
    classifier (accuracy), and an instruction-tuned model without --data (held-out response
    perplexity), run on `device`. Prints the figures and returns True when it handled the
    model; returns False when the plain perplexity evaluation applies. Raises ConfigError
    when --reference or --model names a classifier in a comparison."""
    folder = resolve_model_path(args.model)
    reference = getattr(args, "reference", None)
    if reference:
        for f in (folder, resolve_model_path(reference)):
            if is_classifier(f):
                raise ConfigError(
                    f"{f} is a classifier: --reference compares language models' next-token distributions; "
                    "evaluate a classifier alone (accuracy), or compare two language models"
                )
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if is_classifier(folder):
        _print_classifier_eval(args, folder, device)
        return True
    manifest = read_manifest(folder)
    if reference is None and args.data is None and is_instruction_model(manifest):
        _print_instruct_eval(args, folder, manifest.settings["data"], device)
        return True
    return False


def _print_instruct_eval(args: argparse.Namespace, folder: Path, data: str, device: torch.device | str) -> None:
    r = evaluate_instruct(folder, args.max_length, device)
    if args.json:
        print(json.dumps({"model": str(args.model), **r}, indent=2))
    else:
        print(f"response perplexity {r['val_response_ppl']:.4f} (loss {r['val_response_loss']:.4f}) over "
              f"{r['val_response_tokens']:,} response tokens of {r['examples']} held-out examples of {data}")


def _print_classifier_eval(args: argparse.Namespace, folder: Path, device: torch.device | str) -> None:
    loaded = load_classifier(folder, device=device)
    r = evaluate_classifier(loaded, args.data, args.max_length)
    if args.json:
        print(json.dumps({"model": str(args.model), **r}, indent=2))
    else:
        print(f"accuracy {r['accuracy']:.4f} (macro F1 {r['macro_f1']:.4f}) over {r['examples']:,} examples "
              f"of {r['data']}")
        print(format_confusion(r["confusion"]))

