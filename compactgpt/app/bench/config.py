"""BenchConfig: every input of a benchmark run, checked on creation; the measurement
settings are saved with every figure, the run's folders and switches are not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import StageConfig, option, run_option
from ...device import DEVICE_HELP, resolve_device
from ...errors import ConfigError


@dataclass
class BenchConfig(StageConfig):
    """Settings of one benchmark run; the saved ones travel with every figure."""

    # What is measured and where the report goes. Not saved (saved=False): the report names
    # every row's folder itself, and a pipeline's measurements keep their fingerprints.
    models: list[str] = option(default_factory=list, help="artifact folders to measure: float, quantized, ONNX "
                               "(ONNX Runtime) or GGUF (llama.cpp, with llama-cpp-python; timed at batch 1)", metavar="DIR",
                               saved=False)
    names: list[str] = option(default_factory=list, help="row names (default: the folder names)", metavar="NAME",
                              saved=False)
    baseline: str = option("", "name of the baseline row (default: the first language model)", saved=False)
    out: str = option("", "folder for report.md, report.json and the plots", saved=False)
    data: str = option("", "prepared data folder whose val split is scored (made with the models' tokenizer, "
                           "e.g. the teacher's data folder)")
    eval_tokens: int = option(32768, "tokens scored for perplexity (0: the whole split)")
    stride: int = option(0, "sliding-window stride (0: half the model's context)")
    prompt_tokens: int = option(64, "prompt length for the speed runs")
    new_tokens: int = option(64, "tokens generated per speed run")
    batch_sizes: str = option("1,8", "comma-separated batch sizes for the speed runs (the first is the headline)")
    warmup: int = option(1, "untimed runs before the timed ones")
    repeats: int = option(5, "timed runs; medians and p90 are over their step times")
    # Saved, unlike other stages' threads: the figures depend on it.
    threads: int = option(2, "CPU threads for every runtime (fixed so that figures compare)")
    memory: bool = option(True, "measure peak resident memory in a separate process per artifact")
    seed: int = option(0, "seed that picks the prompt windows from the validation text")
    # Not saved with the settings (saved=False) so that a pipeline's measurements keep their
    # fingerprints; each PyTorch row records the device it ran on instead.
    device: str = option("auto", f"where PyTorch and quantized rows run: {DEVICE_HELP}; ONNX rows run on "
                                 "ONNX Runtime's CPU provider", saved=False)
    overwrite: bool = run_option("overwrite", "write the report into a folder that holds an artifact (an earlier "
                                              "report there is always replaced)")
    progress: bool = run_option("progress")
    # How the run was started, recorded in the report; set by the caller, not a flag.
    command: str = option("", "the command line recorded in the report", flag=False, saved=False)

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting and the fix."""
        resolve_device(self.device)  # a device this machine lacks is refused before any measurement
        if self.eval_tokens < 0 or self.stride < 0:
            raise ConfigError("eval_tokens and stride must be >= 0")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise ConfigError(f"prompt_tokens must be >= 1 and new_tokens >= 2 (decode speed needs two steps); "
                              f"got {self.prompt_tokens}, {self.new_tokens}")
        if self.warmup < 0 or self.repeats < 1 or self.threads < 1:
            raise ConfigError(f"warmup must be >= 0, repeats >= 1, threads >= 1; got {self.warmup}, {self.repeats}, "
                              f"{self.threads}")
        self.batches  # validates the list
        if self.names and len(self.names) != len(self.models):
            raise ConfigError(f"--names gives {len(self.names)} names for {len(self.models)} models; give one "
                              "name per model or none")
        if len(set(self.row_names)) != len(self.row_names):
            raise ConfigError(f"model names must be distinct, got {self.row_names}; name the rows with --names")
        if self.models and self.baseline and self.baseline not in self.row_names:
            raise ConfigError(f"baseline {self.baseline!r} is not one of the models {self.row_names}")

    @property
    def batches(self) -> list[int]:
        """The batch sizes of the speed runs; ConfigError for a malformed list."""
        try:
            out = [int(b) for b in str(self.batch_sizes).split(",") if b.strip()]
        except ValueError as e:
            raise ConfigError(f"batch_sizes {self.batch_sizes!r} must be comma-separated integers, e.g. 1,8") from e
        if not out or min(out) < 1:
            raise ConfigError(f"batch_sizes {self.batch_sizes!r} must list positive batch sizes, e.g. 1,8")
        return out

    @property
    def row_names(self) -> list[str]:
        """The report's row names, one per model: `names`, else the folders' names."""
        return list(self.names) or [Path(m).name for m in self.models]
