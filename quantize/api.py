"""`quantize_(model, config, calibration)`: the one entry point of every method.

The handler of each config type is registered beside that method's code (`rtn.py`,
`gptq.py`, `awq.py`, `smoothquant.py`, `bnb.py`, through `handlers.register_handler`) and
found here by the config's type; the storage layout of its weights is registered there too
(`handlers.register_layout`) and found by `quantize.artifact`. Calibrated methods share one shape: prepare (embed the
calibration windows), calibrate (run each block and collect what the method needs: Hessians,
activation statistics, input samples), convert (replace the block's projections by
`QuantLinear`s), then feed the block's outputs to the next block: the walk in
`calibrate.walk_blocks`, written once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from compactgpt.errors import ConfigError
from compactgpt.model import GPT

# The method modules register their handlers on import.
from . import awq, bnb, gptq, rtn, smoothquant  # noqa: F401
from .calibrate import CalibrationData
from .config import QuantConfig
from .handlers import check_groups, handler_for
from .mix import plan_mix
from .modules import QuantEmbedding, QuantLinear


@dataclass
class QuantizeReport:
    method: str
    seconds: float
    calibration: dict | None
    config: QuantConfig | None = None  # the settings applied: with the layers' bits when a mix chose them

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "config"}


def quantize_(model: GPT, config: QuantConfig, calibration: CalibrationData | None = None,
              progress: bool = False) -> QuantizeReport:
    """Quantize a GPT in place: its projections (and, if asked, the tied embedding / LM head)
    become quantized modules.

    Raises ConfigError for a config type with no registered handler, a calibrated method
    without calibration data, a group size that does not divide a layer's width, or a model
    that is already quantized.
    """
    handler = handler_for(config)
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ConfigError("the model is already quantized; quantize the float model it came from")
    if config.calibrated and calibration is None:
        raise ConfigError(
            f"{config.method} needs calibration data: pass --data (text or a prepared data folder), "
            "or quantize a model whose manifest records its training data"
        )
    check_groups(model, config)
    model.eval()
    start = time.perf_counter()
    if getattr(config, "bits_per_weight", 0) and not config.module_bits:
        config = config.replace(module_bits=plan_mix(model, config, calibration, progress))
    handler(model, config, calibration, progress)
    model.eval()  # new layers start in training mode, which changes LLM.int8's forward
    return QuantizeReport(config.method, time.perf_counter() - start,
                          calibration.describe() if calibration is not None and config.calibrated else None, config)
