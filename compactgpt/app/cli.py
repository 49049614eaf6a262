"""The `compactgpt` command: one verb per pipeline stage.

Verbs are registered statically in VERBS: the name, the module under compactgpt.app.commands
that implements it, and its one-line help. `compactgpt --help` imports no verb module; a verb
imports only its own module (and, through it, the stages it runs), so `compactgpt info` never
loads ONNX, bitsandbytes or matplotlib.

A verb module defines, for each verb V it implements, `add_V_args(parser)` (which also sets
the parser's description) and `run_V(args)`. Bad input ends with a one-line error that names
the problem and the fix (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import CompactGPTError, WriteError

# verb -> (module under compactgpt.app.commands, one-line help); in pipeline order.
VERBS: dict[str, tuple[str, str]] = {
    "tokenize": ("core", "train a BPE tokenizer and write token shards"),
    "pretrain": ("core", "train a GPT teacher from scratch"),
    "finetune": ("finetune", "adapt a model: domain text (lm), instructions (instruct) or labels (classify)"),
    "classify": ("finetune", "label texts with a classifier folder"),
    "prune": ("distill", "structured pruning: fewer blocks, heads, MLP neurons or channels"),
    "sparsify": ("distill", "zero weights (unstructured or 2:4) by magnitude or Wanda"),
    "distill": ("distill", "train a student on a frozen teacher's outputs"),
    "quantize": ("quantize", "quantize weights: int8 / int4 RTN, GPTQ, AWQ, SmoothQuant, bitsandbytes"),
    "export": ("export", "export a model to ONNX with a KV cache, validated against PyTorch"),
    "deploy": ("deploy", "bundle an ONNX export for the browser, transformers.js, onnxruntime-genai or mobile"),
    "eval": ("core", "perplexity of a model (sliding window); KL divergence from a reference"),
    "generate": ("core", "generate text from a prompt"),
    "bench": ("bench", "measure artifacts side by side and write a report"),
    "pipeline": ("pipeline", "run the whole pipeline from a config: corpus to report, resumable"),
    "info": ("core", "print an artifact's manifest"),
}

DESCRIPTION = ("CompactGPT: train a GPT teacher, compress it into small students, quantize them, export "
               "them to ONNX, deploy them (browser, transformers.js, onnxruntime-genai, mobile) and benchmark "
               "them. Every verb reads and writes artifact folders.")


def _verb_module(verb: str):
    return importlib.import_module(f"compactgpt.app.commands.{VERBS[verb][0]}")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The full parser when `verb` is None (every verb's flags, for docs and tests); else one
    in which only `verb` has its flags, so only its module is imported."""
    parser = argparse.ArgumentParser(prog="compactgpt", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (_, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if verb is None or name == verb:
            getattr(_verb_module(name), f"add_{name}_args")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb if verb in VERBS else "").parse_args(argv)
    try:
        getattr(_verb_module(args.verb), f"run_{args.verb}")(args)
    except WriteError as e:
        print(f"error: {_write_message(e, args.verb)}", file=sys.stderr)
        return 2
    except (CompactGPTError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C: 130; a SIGTERM the training loop turned into a checkpointed stop: 143.
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:
        # The reader went away (`compactgpt info X | head`): stop quietly, as Unix tools do; stdout
        # is pointed at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        # A write fault outside every claimed folder (the pipeline's own records) gets the same
        # one line; anything else is a bug, and its traceback is wanted.
        from ..outputs import write_error  # loads torch: only once something failed

        error = write_error(e)
        if error is None:
            raise
        print(f"error: {_write_message(error, args.verb)}", file=sys.stderr)
        return 2
    return 0


def _write_message(error: WriteError, verb: str) -> str:
    # The pipeline resumes an interrupted training stage by itself: it has no --resume flag.
    return error.message(resume_flag=verb != "pipeline")


if __name__ == "__main__":
    sys.exit(main())
