"""The finetuning stage's settings: one field per CLI flag, its help text on the field, saved
into the artifact the stage writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import option, run_option
from ..errors import ConfigError
from ..training import LoopConfig
from .lora import LORA_TARGETS

STAGE = "finetune"

# The tasks the stage knows; the stage's TASKS registry maps each to its builder.
TASK_NAMES = ("lm", "instruct", "classify")


@dataclass
class FinetuneConfig(LoopConfig):
    """Settings of the finetuning stage; one CLI flag per field; saved in the artifact.

    The learning rates default by method (3e-4 full, 2e-3 LoRA; min_lr = lr / 10): they are
    filled on creation (`resolve`), so the saved settings hold the rates that were used.
    """

    model: str = option("", "parent model folder")
    task: str = option("instruct", "what to finetune for")
    data: str = option("", "training data (format depends on --task)")
    out: str = option("", "artifact folder to write (checkpoints in OUT/checkpoint)")
    val_data: str | None = option(None, "held-out file in the --data format (default: hold out --val-fraction of --data)")
    val_fraction: float = option(0.1, "share of --data held out when --val-data is not given "
                                 "(stratified by label for classify)")
    max_length: int | None = option(None, "tokens per example (instruct/classify) or training window (lm); "
                                    "default the model's n_positions")
    template: str = option("alpaca", "instruct: prompt template, a built-in name (alpaca, compact) or a JSON file "
                           "with with_input and without_input, each ending in {response}")
    min_response_tokens: int = option(32, "instruct: response tokens kept when an example exceeds --max-length "
                                      "(the prompt's beginning is cut instead)")
    text_field: str = option("text", "field or column holding the text (JSONL/CSV/TSV with a header)")
    label_field: str = option("label", "classify: field or column holding the label")
    columns: str = option("auto", "classify: column order of a CSV/TSV without header, e.g. label,text (auto: the "
                          "column with fewer distinct values is the label)")
    lora_rank: int = option(0, "LoRA rank; 0 finetunes every weight. Adapters are merged into plain weights on "
                            "save")
    lora_alpha: float = option(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_targets: str = option(",".join(LORA_TARGETS), "comma-separated module suffixes that get adapters")
    eval_max_tokens: int = option(65536, "lm: tokens scored per perplexity figure")
    eval_samples: int = option(3, "instruct: held-out prompts answered before and after (stored in the manifest)")
    sample_tokens: int = option(64, "instruct: max tokens per sample answer")
    # Loop settings with finetuning defaults (a short run at a low rate on a trained model).
    max_steps: int = option(300, "optimizer steps")
    batch_size: int = option(16, "examples (or windows) per micro-step")
    lr: float | None = option(None, "peak learning rate (default 3e-4; 2e-3 with LoRA)")
    min_lr: float | None = option(None, "final learning rate (default lr / 10)")
    warmup_steps: int = option(20, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    eval_interval: int = option(100, "steps between validations")
    checkpoint_interval: int = option(100, "steps between checkpoints")
    seed: int = option(1337, "random seed (split, head init, batch order)")
    # How the run goes, not what it writes: unsaved (compactgpt.config.RUN_SETTINGS).
    overwrite: bool = run_option("overwrite", "discard an existing checkpoint in OUT and start over")
    resume: bool = run_option("resume", "continue from OUT/checkpoint")
    threads: int | None = run_option("threads")
    progress: bool = run_option("progress")

    def __post_init__(self) -> None:
        # The rate defaults depend on lora_rank, so they are filled before the checks run.
        self.resolve()

    def resolve(self) -> "FinetuneConfig":
        """Fill the defaults that depend on other settings, then validate. Idempotent."""
        if self.lr is None:
            self.lr = 2e-3 if self.lora_rank > 0 else 3e-4
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.check_numbers()
        self.validate()
        return self

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.task not in TASK_NAMES:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {sorted(TASK_NAMES)}")
        if self.lr is None or self.min_lr is None:
            raise ConfigError("lr and min_lr are unset; call resolve() first")
        super().validate()
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (0 = full finetuning), got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.eval_samples < 0 or self.sample_tokens < 1 or self.min_response_tokens < 1:
            raise ConfigError("--eval-samples must be >= 0, --sample-tokens and --min-response-tokens >= 1")
        if self.eval_max_tokens < 2:
            raise ConfigError(f"--eval-max-tokens must be at least 2 (perplexity scores token pairs), "
                              f"got {self.eval_max_tokens}")

    def targets(self) -> tuple[str, ...]:
        """The LoRA target suffixes as a tuple."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def config_from_settings(settings: dict) -> FinetuneConfig:
    """The FinetuneConfig a finetuned artifact's manifest settings record, to rebuild the
    held-out split the stage used. Keys this version does not know are passed over, so an
    artifact stays readable after a setting is retired. Raises ConfigError when the settings
    name no data or hold invalid values."""
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in settings.items() if k in known}
    # A split needs only the data settings; a hand-written manifest may not name the run's folders.
    for name in ("model", "out"):
        values.setdefault(name, "(not recorded)")
    return FinetuneConfig(**values)
