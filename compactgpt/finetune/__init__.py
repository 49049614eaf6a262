"""The finetuning stage: domain adaptation (lm), instruction tuning (instruct) and
classification (classify), each with optional LoRA.

    finetune(FinetuneConfig(model="runs/teacher", task="instruct", data="data.json", out="runs/chat"))

One module per task (lm, instruct, classify) builds what the shared runner (stage) trains;
data holds the pure readers, templates, splits and batching; lora the adapters. The
functions other layers call are re-exported here.
"""

from ..artifacts import CLASSIFIER_ARCH, register_folder_kind
from .classify import (GPTClassifier, LoadedClassifier, classifier_max_length, classify_split, classify_texts,
                       encode_texts, evaluate_classifier, evaluate_examples, format_confusion, heldout_examples,
                       load_classifier, predict, save_classifier)
from .config import STAGE, TASK_NAMES, FinetuneConfig, config_from_settings
from .instruct import evaluate_instruct, instruct_split, is_instruction_model, prompt_for_generation, stored_template
from .lora import LORA_TARGETS, apply_lora, merge_lora, trainable_parameters
from .stage import TASKS, finetune, summary

# A classifier's config.json declares transformers' sequence-classification class.
register_folder_kind("classifier", "a GPT-2 with a classification head",
                     lambda files: CLASSIFIER_ARCH in (files.config.get("architectures") or []), rank=2,
                     marker="config.json")

__all__ = [
    "FinetuneConfig", "STAGE", "TASKS", "TASK_NAMES", "finetune", "summary", "config_from_settings",
    "instruct_split", "evaluate_instruct", "is_instruction_model", "prompt_for_generation", "stored_template",
    "GPTClassifier", "LoadedClassifier", "classify_split", "classify_texts", "encode_texts", "evaluate_classifier",
    "evaluate_examples", "format_confusion", "heldout_examples", "classifier_max_length", "load_classifier",
    "predict", "save_classifier",
    "LORA_TARGETS", "apply_lora", "merge_lora", "trainable_parameters",
]
