"""The `compactgpt` command: one verb per pipeline stage.

Every verb reads and writes artifact folders; bad input ends with a one-line error that
names the problem and the fix (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path

from .errors import CompactGPTError

TRAIN_HELP = {
    "data": "training text: a file, folder, glob, JSONL file, prepared data folder, or @stdlib "
            "(the Python standard library's sources; the default)",
    "out": "artifact folder to write (checkpoints go in OUT/checkpoint)",
    "preset": "model and schedule preset: tiny (tests), small (CPU, ~15 min), gpt2-124m (GPU)",
    "vocab_size": "BPE vocabulary size when the data is tokenized here",
    "val_fraction": "share of documents held out for validation",
    "text_field": "JSONL field that holds the text",
    "block_size": "tokens per training window (<= n-positions)",
    "n_layer": "transformer blocks", "n_head": "attention heads per block", "n_embd": "embedding width",
    "n_inner": "MLP width (default 4 x n-embd)", "n_positions": "longest context (learned positions)",
    "dropout": "dropout rate", "eval_batches": "validation windows per evaluation",
    "max_steps": "optimizer steps", "batch_size": "sequences per micro-step per process",
    "grad_accum": "micro-steps per optimizer step", "lr": "peak learning rate", "min_lr": "final learning rate",
    "warmup_steps": "linear warmup steps", "weight_decay": "AdamW weight decay (matrices and embeddings)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "max gradient norm (0: off)",
    "eval_interval": "steps between validations", "checkpoint_interval": "steps between checkpoints",
    "log_interval": "steps between log lines", "seed": "random seed (weights and batches)",
    "device": "auto, cpu, cuda or cuda:N", "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16",
    "compile": "torch.compile the model",
}


def _arg_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp  # Optional[int] / int | None -> int


def add_config_args(parser: argparse.ArgumentParser, cls, help: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field; defaults are None so that only given flags override."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _arg_type(hints[f.name])
        text = help.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=text, metavar=f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    from .training import PRESETS, TrainConfig

    parser = argparse.ArgumentParser(
        prog="compactgpt",
        description="CompactGPT: train a GPT teacher, compress it into small students, quantize "
        "them, export them to ONNX and benchmark them. Every verb reads and writes artifact folders.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("tokenize", help="train a BPE tokenizer and write token shards",
                       description="Read a corpus, split it by document into train/validation, train a "
                       "byte-level BPE tokenizer and write token shards to a data folder.")
    p.add_argument("--data", default="@stdlib", help="text file, folder, glob, JSONL file or @stdlib (default)")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--tokenizer", help="use the tokenizer of this model or data folder instead of training one")

    p = sub.add_parser("pretrain", help="train a GPT teacher from scratch",
                       description="Pretrain a GPT-2-architecture model. Runs on CUDA (bf16) when a GPU is "
                       "visible, else on CPU in float32. Launch with torchrun for several processes. "
                       f"Presets: {', '.join(PRESETS)}; "
                       "a flag given overrides the preset's value.")
    add_config_args(p, TrainConfig, TRAIN_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with its settings (starts fresh when there is none yet)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing checkpoint in OUT and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to OUT/log.jsonl)")

    p = sub.add_parser("eval", help="perplexity of a model (sliding window); KL divergence from a reference",
                       description="Perplexity by the fixed-length sliding-window method, for a float, "
                       "quantized or ONNX model folder. Without --data, the model's own held-out validation "
                       "split is used. With --reference (the model it was compressed from), also the KL "
                       "divergence of its next-token distributions from the reference's and how often both "
                       "rank the same token first: a finer measure of what compression cost than a "
                       "perplexity difference, which can be smaller than its own noise.")
    p.add_argument("--model", required=True, help="model folder (float, quantized or ONNX)")
    p.add_argument("--reference", help="model folder to compare with (same tokenizer), e.g. the fp32 teacher")
    p.add_argument("--data", help="text file, folder, glob, JSONL file or prepared data folder (its val split)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-length", type=int, help="window length (default: the model's n_positions)")
    p.add_argument("--stride", type=int, help="step between windows (default: max-length / 2)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Stream a continuation of a prompt. Temperature 0 is greedy decoding.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--prompt", default="", help="prompt text (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--threads", type=int, help="CPU threads")

    p = sub.add_parser("info", help="print an artifact's manifest",
                       description="Print what an artifact is: stage, settings, parent, metrics, versions.")
    p.add_argument("folder", help="artifact folder")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")

    for module in PLUGINS:
        importlib.import_module(module).register(sub, COMMANDS)
    return parser


# ---------------------------------------------------------------------------------------
# Verbs


def cmd_tokenize(args) -> None:
    from .data import DataConfig, prepare_data
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(args.tokenizer) if args.tokenizer else None
    cfg = DataConfig(source=args.data, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                     text_field=args.text_field)
    out = prepare_data(cfg, args.out, tokenizer=tokenizer, log=lambda m: print(m, file=sys.stderr))
    from .artifacts import read_manifest

    m = read_manifest(out).metrics
    print(f"wrote {out}: {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens from "
          f"{m['documents']:,} documents; vocabulary {m['vocab_size']:,}; unigram val perplexity "
          f"{m['unigram_val_perplexity']:.1f}")


def cmd_pretrain(args) -> None:
    from .training import CHECKPOINT, TrainConfig, config_from_preset, pretrain

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    out = Path(given.get("out", TrainConfig.out))
    saved_settings = out / CHECKPOINT / "settings.json"
    if args.resume and saved_settings.is_file():
        # Resume from files alone: the checkpoint's settings, with the flags given now on top.
        base = json.loads(saved_settings.read_text())
        preset = given.pop("preset", base.pop("preset"))
        base.pop("preset", None)
        config = config_from_preset(preset, **{**base, **given})
    else:
        preset = given.pop("preset", "small")
        config = config_from_preset(preset, **given)
    pretrain(config, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress,
             overwrite=args.overwrite, resume=args.resume)
    print(out)


def eval_tokens(loaded, data: str | None, text_field: str = "text"):
    """Token ids to score: --data's text, a data folder's val split, or the model's own
    validation split found through its manifest."""
    import numpy as np
    import torch

    from .data import TokenShards, is_data_folder, read_documents, split_documents
    from .errors import ConfigError

    tok = loaded.tokenizer
    if data is None:
        # Walk up the parents (export -> quantized -> student -> teacher) to the training data.
        from .artifacts import read_manifest

        manifest = loaded.manifest
        for _ in range(16):
            parent = (manifest.parent or {}).get("path") if manifest else None
            if not parent or is_data_folder(parent) or "data" in manifest.settings or not Path(parent).is_dir():
                break
            manifest = read_manifest(parent)
        if parent and is_data_folder(parent):
            data = parent
        elif manifest and is_data_folder(manifest.settings.get("data") or "/nonexistent"):
            data = manifest.settings["data"]
        elif manifest and "data" in manifest.settings:
            docs, _ = read_documents(manifest.settings["data"], manifest.settings.get("text_field", "text"))
            _, val = split_documents(docs, manifest.settings.get("val_fraction", 0.05))
            ids = []
            for d in val:
                ids.extend(tok.encode(d.text) + [tok.eot_id])
            return torch.tensor(ids[:-1]), "validation split of " + manifest.settings["data"]
        else:
            raise ConfigError(
                f"{loaded.folder} records no training data to hold out from; pass --data with the text to score"
            )
    if is_data_folder(data):
        data_tok = (Path(data) / "tokenizer.json").read_text()
        if data_tok != tok.to_json():
            raise ConfigError(
                f"{data} was tokenized with a different tokenizer than {loaded.folder}'s; pass the raw "
                "text as --data so it is tokenized with the model's own tokenizer"
            )
        return torch.from_numpy(TokenShards(data, "val").all_tokens().astype(np.int64)), f"val split of {data}"
    docs, _ = read_documents(data, text_field)
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tok.eot_id)
        ids.extend(tok.encode(d.text))
    return torch.tensor(ids), data


def open_for_scoring(model: str, threads: int | None):
    """(artifact, logits_fn, n_positions) for a language-model folder of any kind: float
    (CompactGPT or transformers' GPT-2), quantized (run by its PyTorch layers) or an ONNX
    export (run by ONNX Runtime). The artifact has .tokenizer, .manifest and .folder."""
    from .artifacts import load_model, read_config, resolve_model_path
    from .evaluation import model_logits_fn

    from .bench import runtime_kind

    folder = resolve_model_path(model)
    kind = runtime_kind(folder)
    if kind == "onnx":
        from types import SimpleNamespace

        from export.runtime import OnnxDecoder

        from .artifacts import read_manifest
        from .tokenizer import Tokenizer

        loaded = SimpleNamespace(tokenizer=Tokenizer.from_folder(folder), manifest=read_manifest(folder), folder=folder)
        return loaded, OnnxDecoder(folder, threads=threads).logits_fn(), read_config(folder).n_positions
    if kind == "pytorch-quantized":
        from quantize import load_quantized

        loaded = load_quantized(folder)
    else:
        loaded = load_model(folder)
    return loaded, model_logits_fn(loaded.model), loaded.model.config.n_positions


def cmd_eval(args) -> None:
    import torch

    from .errors import ConfigError
    from .evaluation import compare, perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    from .finetune import eval_finetuned

    if eval_finetuned(args):  # a classifier's accuracy; an instruction model's held-out response perplexity
        return
    loaded, logits_fn, n_positions = open_for_scoring(args.model, args.threads)
    tokens, source = eval_tokens(loaded, args.data, args.text_field)
    max_length = args.max_length or n_positions
    reference = None
    if args.reference:
        reference, reference_fn, ref_positions = open_for_scoring(args.reference, args.threads)
        if reference.tokenizer.to_json() != loaded.tokenizer.to_json():
            raise ConfigError(
                f"{args.reference} has a different tokenizer than {args.model}: their next-token "
                "distributions cannot be compared; give the model it was compressed from as --reference"
            )
        n_positions = min(n_positions, ref_positions)
    if max_length > n_positions:
        holder = "the model's" if reference is None else "the two models'"
        raise ConfigError(
            f"--max-length {max_length} is longer than {holder} {n_positions} positions; use --max-length {n_positions} or less"
        )
    progress = not args.json
    if reference is None:
        result = perplexity(logits_fn, tokens, max_length, args.stride, progress=progress)
        record = {"model": str(args.model), "data": source, **result.to_dict()}
        summary = (f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f}) over {result.tokens:,} tokens "
                   f"of {source}; windows of {result.max_length}, stride {result.stride}")
    else:
        result = compare(logits_fn, reference_fn, tokens, max_length, args.stride, progress=progress)
        record = {"model": str(args.model), "reference": str(args.reference), "data": source, **result.to_dict()}
        delta = 100 * (result.perplexity / result.reference_perplexity - 1)
        summary = (f"perplexity {result.perplexity:.4f} vs reference {result.reference_perplexity:.4f} "
                   f"({delta:+.2f}%)\nKL(reference || model) per token: mean {result.kl_mean:.5f} nats, "
                   f"median {result.kl_median:.5f}, p99 {result.kl_p99:.5f}; same top-1 token "
                   f"{100 * result.top1_agreement:.2f}%\nover {result.tokens:,} tokens of {source}; windows of "
                   f"{result.max_length}, stride {result.stride}")
    print(json.dumps(record, indent=2) if args.json else summary)


def cmd_generate(args) -> None:
    import torch

    from .artifacts import load_model, resolve_model_path
    from .finetune import prompt_for_generation

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model_path(args.model)
    from .finetune_classify import is_classifier

    if is_classifier(folder):
        from .errors import ConfigError

        raise ConfigError(f"{folder} is a classifier (it predicts labels, not text); run "
                          f"`compactgpt classify --model {folder} --text ...` instead")
    if (folder / "model.onnx").is_file():  # an ONNX export runs on ONNX Runtime, with the same stream contract
        model, tok = importlib.import_module("export.cli").onnx_decoder(args)
    else:
        loaded = load_model(folder)
        model, tok = loaded.model, loaded.tokenizer
    # An instruction-tuned model reads the prompt inside the template it was trained with.
    text = prompt_for_generation(folder, args.prompt)
    ids = tok.encode(text) if text else [tok.eot_id]
    generator = torch.Generator().manual_seed(args.seed)
    stream = model.stream(
        torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, generator=generator,
        stop_tokens=() if args.no_stop else (tok.eot_id,),
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


def cmd_info(args) -> None:
    from .artifacts import read_config, read_manifest
    from .errors import ArtifactError

    folder = Path(args.folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / "config.json").is_file():
            cfg = read_config(folder)
            print(f"{folder}: a GPT-2 folder without a CompactGPT manifest\n  {cfg}")
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


# Modules that add verbs of later stages: each has register(subparsers, commands), which adds
# its parsers and maps each verb name to a function taking the parsed args.
PLUGINS: tuple[str, ...] = (
    "distill.cli",
    "export.cli",
    "quantize.cli",
    "compactgpt.finetune",
    "compactgpt.bench",
    "compactgpt.pipeline",
)

COMMANDS = {"tokenize": cmd_tokenize, "pretrain": cmd_pretrain, "eval": cmd_eval, "generate": cmd_generate,
            "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.verb](args)
    except (CompactGPTError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
