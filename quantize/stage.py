"""The quantize stage on folders: a float model folder in, a quantized artifact folder out.

`quantize_folder` is what the `compactgpt quantize` verb, the pipeline and the benchmark all
run: load the float model, find its calibration data (by default the data it was trained
on, found through its manifests), `quantize_`, optionally score it against the float model,
save the artifact and check that it loads. `evaluate_quantized` is the scoring alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from compactgpt.device import device_of, resolve_device
from compactgpt.errors import ConfigError
from compactgpt.lineage import data_folder_tokens, heldout_tokens, training_data_folder
from compactgpt.model import GPT
from compactgpt.outputs import claim_output

from .api import quantize_
from .artifact import layout_for, load_quantized, save_quantized
from .calibrate import CalibrationData, load_calibration
from .config import QuantConfig


def validation_tokens(loaded) -> tuple[torch.Tensor, str]:
    """The text a quantized model is scored on, and its description: the val split of the data
    folder the model's family was pretrained on, else its held-out text as `compactgpt eval`
    scores it by default. `loaded` is a loaded model or quantized artifact (folder, manifest,
    tokenizer). Raises ConfigError when the model's manifests record no training data."""
    data = training_data_folder(loaded.folder)
    if data is None:
        return heldout_tokens(loaded.folder, loaded.manifest, loaded.tokenizer)
    return data_folder_tokens(data, loaded.tokenizer, loaded.folder), f"val split of {data}"


def resolve_calibration(loaded, config: QuantConfig, calib_data: str | Path | None = None,
                        name: str | Path | None = None) -> CalibrationData | None:
    """The calibration windows for `config` (None for methods that need none): from
    `calib_data`, else from the train split of the data the model was trained on. Raises
    ConfigError when neither is there; `name` is how the error names the model."""
    if not config.calibrated:
        return None
    source = calib_data or training_data_folder(loaded.folder)
    if source is None:
        raise ConfigError(
            f"{config.method} needs calibration data and {name or loaded.folder} records no training data "
            "folder; pass --calib-data with text like the model's training data"
        )
    seq_len = config.calib_seq_len or loaded.model.config.n_positions
    return load_calibration(source, loaded.tokenizer, config.calib_samples, seq_len, config.seed)


def evaluate_quantized(quantized: GPT | str | Path, reference: str | Path, *, progress: bool = False) -> dict:
    """Score a quantized model (in memory, or a quantized artifact folder) against the float
    model folder it came from, on the reference's validation text (`validation_tokens`).

    Returns manifest metrics: val_perplexity, float_val_perplexity, val_kl_mean (KL of the
    quantized model's next-token distributions from the float model's, the damage that a
    perplexity difference of a few hundredths hides), val_top1_agreement, val_tokens, val_data.
    Both models run on the in-memory model's device (a folder is opened on the CPU).
    """
    from compactgpt.artifacts import load_model
    from compactgpt.evaluation import compare_models, model_logits_fn

    model = load_quantized(quantized).model if isinstance(quantized, (str, Path)) else quantized
    device = device_of(model)
    float_model = load_model(reference, device=device)
    tokens, source = validation_tokens(float_model)
    result = compare_models(model_logits_fn(model, device), model_logits_fn(float_model.model.eval(), device),
                            tokens, model.config.n_positions, progress=progress)
    return dict(val_perplexity=result.perplexity, val_tokens=result.tokens, val_data=source,
                float_val_perplexity=result.reference_perplexity, val_kl_mean=result.kl_mean,
                val_top1_agreement=result.top1_agreement)


def quantize_folder(model: str | Path, out: str | Path, config: QuantConfig, *, calib_data: str | None = None,
                    progress: bool = True, log: Callable[[str], None] = print, layout: str | None = None,
                    evaluate: bool = False, device: str | torch.device = "auto", overwrite: bool = False) -> Path:
    """Quantize the float model folder `model` with `config` into the artifact folder `out`.

    calib_data: calibration text or prepared data folder (default: the model's training
    data); layout: storage layout (default: the method's own, see `artifact.layout_for`);
    evaluate: also score it against the float model (`evaluate_quantized`) and record the
    figures in the manifest; device: where the model is calibrated, quantized and scored
    (`compactgpt.device.resolve_device`; bitsandbytes methods use its CUDA kernels on a GPU).
    The device is not a setting of the artifact: it is not saved, and the artifact is written
    from CPU tensors in the same format on any device. Logs one summary line through `log`;
    returns `out` as a Path. Raises ConfigError for an impossible layout, a device this
    machine lacks or an `out` that claim_output refuses (the model folder or a folder above it,
    another artifact unless overwrite, a run already writing it), all before any work, or for
    missing calibration data; ArtifactError for an unusable model folder.
    """
    layout = layout_for(config, layout)  # refuse an impossible layout before any work
    device = resolve_device(device)
    with claim_output(out, stage="quantize", inputs={"--model": model, "--calib-data": calib_data},
                      overwrite=overwrite):
        return _quantize_into(model, out, config, calib_data, progress, log, layout, evaluate, device)


def _quantize_into(model, out, config: QuantConfig, calib_data, progress: bool, log, layout: str, evaluate: bool,
                   device: torch.device) -> Path:
    from compactgpt.artifacts import load_model, resolve_model_path

    loaded = load_model(resolve_model_path(model), device=device)
    calibration = resolve_calibration(loaded, config, calib_data, model)
    report = quantize_(loaded.model, config, calibration, progress=progress)
    metrics = {"quantize_seconds": round(report.seconds, 3)}
    if evaluate:
        metrics.update(evaluate_quantized(loaded.model, loaded.folder, progress=progress))
    save_quantized(out, loaded.model, loaded.tokenizer, config, layout=layout, parent=loaded.folder,
                   metrics=metrics, extra={"calibration": report.calibration})
    load_quantized(out)  # the artifact must load before it is announced
    log(_summary(out, config, report.seconds, metrics))
    return Path(out)


def _summary(out: str | Path, config: QuantConfig, seconds: float, metrics: dict) -> str:
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    head = f" (LM head {config.bits_for('lm_head')}-bit)" if config.bits_for("lm_head") != config.bits else ""
    line = f"wrote {out}: {config.method} {config.bits}-bit{head} in {seconds:.1f}s, weights {size / 1e6:.2f} MB"
    if "val_perplexity" in metrics:
        delta = 100 * (metrics["val_perplexity"] / metrics["float_val_perplexity"] - 1)
        line += (f", validation perplexity {metrics['val_perplexity']:.4f} (float "
                 f"{metrics['float_val_perplexity']:.4f}, {delta:+.2f}%), KL from float {metrics['val_kl_mean']:.5f} "
                 f"nats/token, same top-1 token {100 * metrics['val_top1_agreement']:.2f}%")
    return line
