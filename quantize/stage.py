"""The quantize stage on folders: a float model folder in, a quantized artifact folder out.

`quantize_folder(QuantizeConfig(...))` is what the `compactgpt quantize` verb, the pipeline
and the benchmark all run: load the float model, find its calibration data (by default the
data it was trained on, found through its manifests), `quantize_`, optionally score it against
the float model, save the artifact and check that it loads. `evaluate_quantized` is the
scoring alone.

A QuantizeConfig holds the whole run: the folders, the method's config (what the artifact
saves, in its manifest and config.json, exactly as `quantize_(model, config)` takes it) and how
the run goes. Only the method's config is saved into the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compactgpt.calibration import calibration_windows, data_tokens, heldout_tokens
from compactgpt.config import StageConfig, option, run_option
from compactgpt.device import DEVICE_HELP, cpu_threads, device_of, resolve_device
from compactgpt.errors import ConfigError
from compactgpt.model import GPT
from compactgpt.outputs import claim_output

from .api import quantize_
from .artifact import layout_for, load_quantized, save_quantized
from .calibrate import CalibrationData
from .config import QuantConfig, config_from_dict


@dataclass
class QuantizeConfig(StageConfig):
    """Settings of one quantize run. The method's config (`method`) is what the artifact saves;
    the folders and the run settings are the run's own."""

    model: str = option("", "float model folder to quantize")
    out: str = option("", "quantized artifact folder to write")
    # A QuantConfig (or its dict, as QuantConfig.to_dict writes it); the CLI builds it from
    # --method and the method's own flags.
    method: QuantConfig | None = option(None, "quantization method", flag=False)
    # The same flag as prune's and sparsify's calibration data (compactgpt.calibration reads all three).
    data: str | None = option(None, "calibration data: text (file, folder, glob, JSONL) or a prepared data folder "
                              "(its train split); default: the data the model was trained on")
    layout: str | None = option(None, "storage layout: gptq or bnb (default: gptq for integer methods, bnb for "
                                "bitsandbytes methods)")
    eval: bool = option(False, "measure the quantized model's perplexity on the validation split of the data the "
                        "model was trained on and record it in the manifest")
    device: str = option("auto", f"where to calibrate, quantize and score: {DEVICE_HELP}; bitsandbytes methods use "
                         "its CUDA kernels on a GPU", saved=False)
    overwrite: bool = run_option("overwrite")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress")

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):  # settings read back from JSON
            self.method = config_from_dict(self.method)
        super().__post_init__()

    def validate(self) -> None:
        if not self.model or not self.out:
            raise ConfigError("quantize needs --model (a float model folder) and --out (the folder to write)")
        if not isinstance(self.method, QuantConfig):
            raise ConfigError(f"quantize needs a method config (e.g. RTNConfig(bits=8) or --method rtn), got "
                              f"{self.method!r}")
        layout_for(self.method, self.layout)  # an impossible layout is refused before any work
        resolve_device(self.device)  # so is a device this machine lacks

    def to_dict(self) -> dict:
        return {**super().to_dict(), "method": self.method.to_dict()}


def resolve_calibration(loaded, config: QuantConfig, data: str | Path | None = None) -> CalibrationData | None:
    """The calibration windows for `config` (None for methods that need none), drawn as prune
    and sparsify draw theirs (`compactgpt.calibration.calibration_windows`) from the train
    split of `data`, else of the data the model was trained on. `loaded` is a loaded
    model (folder, tokenizer, model). Raises ConfigError when neither is there, or for a data
    folder with another tokenizer; DataError for too little text."""
    if not config.calibrated:
        return None
    tokens = data_tokens(data, loaded, flag="--data")
    ids = calibration_windows(tokens.train, config.calib_samples, config.calib_seq_len,
                              loaded.model.config.n_positions, config.seed)
    return CalibrationData(ids, f"train split of {tokens.source}")


def evaluate_quantized(quantized: GPT | str | Path, reference: str | Path, *, progress: bool = False) -> dict:
    """Score a quantized model (in memory, or a quantized artifact folder) against the float
    model folder it came from, on the reference's held-out text (`compactgpt.calibration.heldout_tokens`,
    what `compactgpt eval` scores by default).

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
    tokens, source = heldout_tokens(float_model.folder, float_model.manifest, float_model.tokenizer)
    result = compare_models(model_logits_fn(model, device), model_logits_fn(float_model.model.eval(), device),
                            tokens, model.config.n_positions, progress=progress)
    return dict(val_perplexity=result.perplexity, val_tokens=result.tokens, val_data=source,
                float_val_perplexity=result.reference_perplexity, val_kl_mean=result.kl_mean,
                val_top1_agreement=result.top1_agreement)


def quantize_folder(config: QuantizeConfig, log: Callable[[str], None] = print) -> Path:
    """Quantize the float model folder config.model with config.method into the artifact
    folder config.out.

    data: calibration text or prepared data folder (default: the model's training
    data); layout: storage layout (default: the method's own, see `artifact.layout_for`);
    eval: also score it against the float model (`evaluate_quantized`) and record the figures
    in the manifest; device: where the model is calibrated, quantized and scored
    (`compactgpt.device.resolve_device`; bitsandbytes methods use its CUDA kernels on a GPU).
    The artifact is written from CPU tensors in the same format on any device. Logs one
    summary line through `log`; returns config.out as a Path. Raises ConfigError for an `out`
    that claim_output refuses (the model folder or a folder above it, another artifact unless
    config.overwrite, a run already writing it), before any work, or for missing calibration
    data; ArtifactError for an unusable model folder.
    """
    config.validate()  # the layout and the device, again: the config may have been changed since
    with cpu_threads(config.threads), claim_output(config.out, stage="quantize", overwrite=config.overwrite,
                                                   inputs={"--model": config.model, "--data": config.data}):
        return _quantize_into(config, log)


def _quantize_into(config: QuantizeConfig, log: Callable[[str], None]) -> Path:
    from compactgpt.artifacts import load_model, resolve_model_path

    method, out, progress = config.method, config.out, config.progress
    loaded = load_model(resolve_model_path(config.model), device=resolve_device(config.device))
    calibration = resolve_calibration(loaded, method, config.data)
    report = quantize_(loaded.model, method, calibration, progress=progress)
    method = report.config  # with the bits of each layer when --bits-per-weight chose them
    metrics = {"quantize_seconds": round(report.seconds, 3)}
    if config.eval:
        metrics.update(evaluate_quantized(loaded.model, loaded.folder, progress=progress))
    save_quantized(out, loaded.model, loaded.tokenizer, method, layout=layout_for(method, config.layout),
                   parent=loaded.folder, metrics=metrics, extra={"calibration": report.calibration})
    load_quantized(out)  # the artifact must load before it is announced
    log(_summary(out, method, report.seconds, metrics))
    return Path(out)


def _summary(out: str | Path, config: QuantConfig, seconds: float, metrics: dict) -> str:
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    head = f" (LM head {config.bits_for('lm_head')}-bit)" if config.bits_for("lm_head") != config.bits else ""
    if config.module_bits:
        counts: dict[int, int] = {}
        for bits in config.module_bits.values():
            counts[bits] = counts.get(bits, 0) + 1
        head = f" mixed ({', '.join(f'{n} x {b}-bit' for b, n in sorted(counts.items()))}"
        head += f"; LM head {config.bits_for('lm_head')}-bit)" if config.include_embeddings else ")"
    line = f"wrote {out}: {config.method} {config.bits}-bit{head} in {seconds:.1f}s, weights {size / 1e6:.2f} MB"
    if "val_perplexity" in metrics:
        delta = 100 * (metrics["val_perplexity"] / metrics["float_val_perplexity"] - 1)
        line += (f", validation perplexity {metrics['val_perplexity']:.4f} (float "
                 f"{metrics['float_val_perplexity']:.4f}, {delta:+.2f}%), KL from float {metrics['val_kl_mean']:.5f} "
                 f"nats/token, same top-1 token {100 * metrics['val_top1_agreement']:.2f}%")
    return line
