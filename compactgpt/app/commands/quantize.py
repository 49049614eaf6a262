"""`compactgpt quantize`: post-training quantization of a model folder.

One flag per field of the method configs (a field several methods share is one flag, its
help naming the methods that take it and their defaults); flags the chosen method does not
take are refused. The work is `quantize.quantize_folder`.

--device is a flag of the verb, not a field of the method configs: those configs are saved in
the artifact (its manifest and config.json), and where the quantization ran is not a property
of the artifact, whose format is the same on any device.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from functools import lru_cache

DESCRIPTION = (
    "Quantize a model folder's attention and MLP projections (and optionally the tied embedding / LM "
    "head) and write a quantized artifact: GPTQ-layout safetensors with packed integer weights, scales "
    "and zero points (bitsandbytes methods: their own layout). Calibrated methods (gptq, awq, "
    "smoothquant) read --calib-data, by default the model's own training data. Flags a method does not "
    "take are refused."
)


@lru_cache(maxsize=1)
def _method_flags() -> type:
    """A dataclass with every method config's fields once, in registration order, for
    add_config_args: the help text is the field's own, plus the methods that take it (when
    not all do) and their defaults."""
    from quantize.config import METHODS

    from ...config import field_help

    takers: dict[str, list[str]] = {}
    types: dict[str, type] = {}
    texts: dict[str, str] = {}
    for method, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types.setdefault(f.name, hints[f.name])
            texts.setdefault(f.name, field_help(cls, f.name))
            takers.setdefault(f.name, []).append(method)
    fields = []
    for name, methods in takers.items():
        text = texts[name]
        if len(methods) < len(METHODS):
            text += f" [{', '.join(methods)}]"
        defaults = {m: getattr(METHODS[m](), name) for m in methods}
        if len(set(defaults.values())) == 1:
            text += f" (default {next(iter(defaults.values()))})"
        else:
            text += " (default " + ", ".join(f"{m} {v}" for m, v in defaults.items()) + ")"
        fields.append((name, types[name], dataclasses.field(default=None, metadata={"help": text})))
    return dataclasses.make_dataclass("QuantizeFlags", fields)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """The flags of `compactgpt quantize`."""
    from quantize.config import METHODS

    from ...config import add_config_args, threads
    from ...device import DEVICE_HELP

    p.description = DESCRIPTION
    p.add_argument("--model", required=True, help="float model folder to quantize")
    p.add_argument("--out", required=True, help="quantized artifact folder to write")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="quantization method")
    p.add_argument("--calib-data", help="calibration text (file, folder, glob, JSONL) or prepared data folder "
                   "(its train split); default: the data folder the model was trained on")
    p.add_argument("--layout", choices=["gptq", "bnb"], help="storage layout (default: gptq for integer "
                   "methods, bnb for bitsandbytes methods)")
    p.add_argument("--eval", action="store_true", help="measure the quantized model's perplexity on the "
                   "validation split of the data the model was trained on and record it in the manifest")
    p.add_argument("--device", default="auto", help=f"where to calibrate, quantize and score: {DEVICE_HELP}; "
                   "bitsandbytes methods use its CUDA kernels on a GPU (default auto)")
    p.add_argument("--threads", type=threads, help="CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact already in OUT (never the --model folder)")
    add_config_args(p, _method_flags())


def config_from_args(args: argparse.Namespace):
    """The method's config from the flags given; flags the method does not take are errors."""
    from quantize.config import METHODS

    from ...config import given_args
    from ...errors import ConfigError

    cls = METHODS[args.method]
    own = {f.name for f in dataclasses.fields(cls)}
    given = given_args(args, _method_flags())
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ConfigError(f"--method {args.method} does not take {flags}; its settings are "
                          f"{', '.join('--' + n.replace('_', '-') for n in sorted(own))}")
    return cls(**given)


def run_quantize(args: argparse.Namespace) -> None:
    """Quantize the model the flags name; the summary goes to stderr, the folder to stdout."""
    import torch

    from quantize import quantize_folder

    from ...device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    device = resolve_device(args.device)  # a device this machine lacks is refused before any work
    quantize_folder(args.model, args.out, config, calib_data=args.calib_data, progress=not args.no_progress,
                    log=lambda line: print(line, file=sys.stderr), layout=args.layout, evaluate=args.eval,
                    device=device, overwrite=args.overwrite)
    print(args.out)
