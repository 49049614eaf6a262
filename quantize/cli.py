"""`compactgpt quantize`: post-training quantization of a model folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from compactgpt.errors import ConfigError

from .config import FIELD_HELP, METHODS


def _method_fields() -> dict[str, tuple[type, list[str]]]:
    """Every config field -> (its type, the methods that take it), in a stable order."""
    out: dict[str, tuple[type, list[str]]] = {}
    for method, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, methods = out.get(f.name, (hints[f.name], []))
            out[f.name] = (tp, methods + [method])
    return out


def register(subparsers, commands: dict) -> None:
    """Add the `quantize` verb."""
    methods = sorted(METHODS)
    p = subparsers.add_parser(
        "quantize", help="int8 / 4-bit post-training quantization (RTN, GPTQ, AWQ, SmoothQuant, bitsandbytes)",
        description="Quantize a model folder's attention and MLP projections (and optionally the tied "
        "embedding / LM head) and write a quantized artifact: GPTQ-layout safetensors with packed "
        "integer weights, scales and zero points (bitsandbytes methods: their own layout). Calibrated "
        "methods (gptq, awq, smoothquant) read --calib-data, by default the model's own training data. "
        "Flags a method does not take are refused.",
    )
    p.add_argument("--model", required=True, help="float model folder to quantize")
    p.add_argument("--out", required=True, help="quantized artifact folder to write")
    p.add_argument("--method", required=True, choices=methods, help="quantization method")
    p.add_argument("--calib-data", help="calibration text (file, folder, glob, JSONL) or prepared data folder "
                   "(its train split); default: the data folder the model was trained on")
    p.add_argument("--layout", choices=["gptq", "bnb"], help="storage layout (default: gptq for integer "
                   "methods, bnb for bitsandbytes methods)")
    p.add_argument("--eval", action="store_true", help="measure the quantized model's perplexity on the "
                   "validation split of the data the model was trained on and record it in the manifest")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, (tp, takers) in _method_fields().items():
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0] if typing.get_args(tp) else tp
        flag = "--" + name.replace("_", "-")
        text = FIELD_HELP.get(name, "")
        if len(takers) < len(methods):
            text += f" [{', '.join(takers)}]"
        defaults = {m: getattr(METHODS[m](), name) for m in takers}
        if len(set(defaults.values())) == 1:
            text += f" (default {next(iter(defaults.values()))})"
        else:
            text += " (default " + ", ".join(f"{m} {v}" for m, v in defaults.items()) + ")"
        if tp is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=name, type=tp, default=None, help=text, metavar=name.upper())
    commands["quantize"] = cmd_quantize


def config_from_args(args):
    """The method's config from the flags given; flags the method does not take are errors."""
    cls = METHODS[args.method]
    own = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in _method_fields() if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ConfigError(f"--method {args.method} does not take {flags}; its settings are "
                          f"{', '.join('--' + n.replace('_', '-') for n in sorted(own))}")
    return cls(**given)


def cmd_quantize(args) -> None:
    import torch

    from compactgpt.artifacts import load_model, resolve_model_path

    from .api import default_calibration_source, load_calibration, quantize_
    from .artifact import layout_for, load_quantized, save_quantized

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    layout = layout_for(config, args.layout)  # refuse an impossible layout before any work
    loaded = load_model(resolve_model_path(args.model))
    calibration = None
    if config.calibrated:
        source = args.calib_data or default_calibration_source(loaded.manifest)
        if source is None:
            raise ConfigError(
                f"{config.method} needs calibration data and {args.model} records no training data folder; "
                "pass --calib-data with text like the model's training data"
            )
        seq_len = config.calib_seq_len or loaded.model.config.n_positions
        calibration = load_calibration(source, loaded.tokenizer, config.calib_samples, seq_len, config.seed)
    report = quantize_(loaded.model, config, calibration, progress=not args.no_progress)
    metrics = {"quantize_seconds": round(report.seconds, 3)}
    if args.eval:
        from compactgpt.evaluation import compare, model_logits_fn

        from .api import validation_tokens

        tokens, source = validation_tokens(loaded)
        # Against the float model it came from (read again from its files): perplexity of both,
        # and the KL divergence that a perplexity difference of a few hundredths hides.
        reference = load_model(loaded.folder).model.eval()
        result = compare(model_logits_fn(loaded.model), model_logits_fn(reference), tokens,
                         loaded.model.config.n_positions, progress=not args.no_progress)
        del reference
        metrics.update(val_perplexity=result.perplexity, val_tokens=result.tokens, val_data=source,
                       float_val_perplexity=result.reference_perplexity, val_kl_mean=result.kl_mean,
                       val_top1_agreement=result.top1_agreement)
    save_quantized(args.out, loaded.model, loaded.tokenizer, config, layout=layout, parent=loaded.folder,
                   metrics=metrics, extra={"calibration": report.calibration})
    load_quantized(args.out)  # the artifact must load before it is announced
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(args.out).glob("*.safetensors"))
    line = f"wrote {args.out}: {config.method} {config.bits}-bit in {report.seconds:.1f}s, weights {size / 1e6:.2f} MB"
    if args.eval:
        delta = 100 * (metrics["val_perplexity"] / metrics["float_val_perplexity"] - 1)
        line += (f", validation perplexity {metrics['val_perplexity']:.4f} (float {metrics['float_val_perplexity']:.4f}, "
                 f"{delta:+.2f}%), KL from float {metrics['val_kl_mean']:.5f} nats/token, same top-1 token "
                 f"{100 * metrics['val_top1_agreement']:.2f}%")
    print(line, file=sys.stderr)
    print(args.out)
