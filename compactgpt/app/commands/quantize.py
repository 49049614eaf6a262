"""`compactgpt quantize`: post-training quantization of a model folder.

One flag per field of the run's config (`quantize.QuantizeConfig`: the folders, the
calibration data, the layout, the device and the other run settings) and one per field of the
method configs (a field several methods share is one flag, its help naming the methods that
take it and their defaults); flags the chosen method does not take are refused. The method's
config is what the artifact saves. The work is `quantize.quantize_folder`.
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
    "smoothquant) read --data, by default the model's own training data. Flags a method does not "
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
            if not f.metadata.get("flag", True):
                continue  # set by the stage itself (module_bits) or only through the Python API
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
    """The flags of `compactgpt quantize`: QuantizeConfig's fields, --method (a name of the
    method registry) and the method configs' fields, help texts from the fields."""
    from quantize import QuantizeConfig
    from quantize.config import METHODS

    from ...config import add_config_args, field_help

    p.description = DESCRIPTION
    add_config_args(p, QuantizeConfig)
    p.add_argument("--method", required=True, choices=sorted(METHODS), help=field_help(QuantizeConfig, "method"))
    add_config_args(p.add_argument_group("method settings"), _method_flags())


def config_from_args(args: argparse.Namespace):
    """The method's config from the flags given; flags the method does not take are errors."""
    from quantize.config import METHODS

    from ...config import given_args
    from ...errors import ConfigError

    cls = METHODS[args.method]
    own = {f.name for f in dataclasses.fields(cls) if f.metadata.get("flag", True)}
    given = given_args(args, _method_flags())
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ConfigError(f"--method {args.method} does not take {flags}; its settings are "
                          f"{', '.join('--' + n.replace('_', '-') for n in sorted(own))}")
    return cls(**given)


def run_quantize(args: argparse.Namespace) -> None:
    """Quantize the model the flags name; the summary goes to stderr, the folder to stdout."""
    from quantize import QuantizeConfig, quantize_folder

    from ...config import given_args

    # Checked on creation, before any work: the folders, the layout, the device.
    config = QuantizeConfig(**given_args(args, QuantizeConfig, skip=("method",)), method=config_from_args(args))
    print(quantize_folder(config, log=lambda line: print(line, file=sys.stderr)))
