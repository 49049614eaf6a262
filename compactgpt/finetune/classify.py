"""The classify task: sequence classification on a GPT, a linear head on the last real token.

The artifact follows transformers' `GPT2ForSequenceClassification` layout: `transformer.*`
weights, `score.weight` (num_labels, n_embd), and config.json with `architectures`,
`id2label`, `label2id` and `pad_token_id`. Sequences are right-padded with `pad_token_id`
(`<|endoftext|>`, which a text never contains), so transformers, which pools the rightmost
token that is not the pad id, reads the same position as `last_token_index` here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..artifacts import (CLASSIFIER_ARCH, WEIGHTS, LoadedModel, Manifest, begin_write, check_complete,
                         check_float_weights, config_from_hf, finish_write, hf_config_dict, is_classifier,
                         read_manifest, read_weights, verify_files, weights_file)
from ..errors import ArtifactError, ConfigError
from ..io import atomic_write, atomic_write_json
from ..model import GPT, from_hf_state_dict, to_hf_state_dict
from ..tokenizer import Tokenizer
from .config import STAGE, FinetuneConfig, config_from_settings
from .data import (BucketBatches, LabelledText, check_known_labels, label_set, length_batches, pad_right,
                   read_labelled, safe_label, stratified_split)
from .task import TaskRun, task_max_length


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's rightmost real token (mask 1); 0 for an all-padding row."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class GPTClassifier(nn.Module):
    """A GPT body (its LM head removed) and a linear head on the last real token."""

    def __init__(self, gpt: GPT, num_labels: int):
        super().__init__()
        if num_labels < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
        gpt.lm_head = nn.Identity()  # the body now returns ln_f's output (B, T, C)
        gpt.limit_vocab(None)  # those are hidden states, not token logits: nothing to mask
        self.gpt = gpt
        self.config = gpt.config
        self.score = nn.Linear(gpt.config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_labels). Padding must be on the right.

        The body runs without the padding mask on purpose: attention is causal, so no real
        token sees the padding after it, and the unmasked causal kernel is the fast one.
        """
        hidden = self.gpt(input_ids).logits  # (B, T, C): ln_f's output, through the Identity head
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        index = last_token_index(attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, C)
        return self.score(pooled)


def classification_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the class logits; n counts the real (unpadded) tokens read."""
    ids, mask, labels = batch
    logits = model(ids, mask)
    return F.cross_entropy(logits.float(), labels), int(mask.sum())


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, keeping the first max_length tokens (a text's opening usually says
    what it is; the head then reads the last kept token)."""
    out = []
    for ids in tokenizer.encode_batch(texts):
        ids = [t for t in ids if t != tokenizer.eot_id][:max_length]  # eot is the pad id
        out.append(ids or [tokenizer.eot_id])
    return out


def label_batches(seqs: list[list[int]], labels: list[int], batch_size: int, pad_id: int):
    """Length-bucketed (ids, mask, labels) batches."""
    out = []
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        out.append((ids, mask, torch.tensor([labels[i] for i in idx], dtype=torch.long)))
    return out


@torch.no_grad()
def predict(model: GPTClassifier, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, num_labels) in the order of seqs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = torch.zeros(len(seqs), model.num_labels)
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        probs[idx] = model(ids.to(device), mask.to(device)).float().softmax(-1).cpu()
    model.train(was_training)
    return probs


def confusion_matrix(true: list[int], pred: list[int], n: int) -> list[list[int]]:
    """counts[t][p]: examples of true class t predicted as p."""
    counts = [[0] * n for _ in range(n)]
    for t, p in zip(true, pred):
        counts[t][p] += 1
    return counts


def classification_report(true: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall and the confusion matrix."""
    n = len(labels)
    cm = confusion_matrix(true, pred, n)
    total = max(len(true), 1)
    per_class, f1s = {}, []
    for k, name in enumerate(labels):
        tp = cm[k][k]
        predicted = sum(cm[t][k] for t in range(n))
        actual = sum(cm[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    return {
        "accuracy": sum(cm[k][k] for k in range(n)) / total,
        "macro_f1": sum(f1s) / n,
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": cm},
        "examples": len(true),
    }


def majority_baseline(train_labels: list[int], val_labels: list[int]) -> tuple[int, float]:
    """(the most frequent training class, the accuracy of always predicting it on val)."""
    majority = max(set(train_labels), key=lambda k: (train_labels.count(k), -k))
    return majority, sum(1 for y in val_labels if y == majority) / max(len(val_labels), 1)


def evaluate_examples(model: GPTClassifier, tokenizer: Tokenizer, examples: list[LabelledText],
                      labels: list[str], max_length: int) -> dict:
    """classification_report of the model on labelled examples, plus the mean loss."""
    index = {name: i for i, name in enumerate(labels)}
    seqs = encode_texts(tokenizer, [e.text for e in examples], max_length)
    true = [index[e.label] for e in examples]
    probs = predict(model, seqs, tokenizer.eot_id)
    pred = probs.argmax(-1).tolist()
    report = classification_report(true, pred, labels)
    picked = probs[torch.arange(len(true)), torch.tensor(true)].clamp_min(1e-12)
    report["loss"] = float(-picked.log().mean())
    return report


def format_confusion(confusion: dict) -> str:
    """The confusion matrix as aligned text: rows true, columns predicted."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    width = max(8, *(len(l) for l in labels)) + 1
    head = "true \\ pred".ljust(width) + "".join(l.rjust(width) for l in labels)
    rows = [l.ljust(width) + "".join(str(c).rjust(width) for c in row) for l, row in zip(labels, matrix)]
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------
# Artifacts


def classifier_config_dict(model: GPTClassifier, labels: list[str], pad_token_id: int) -> dict:
    """transformers' config.json of a GPT2ForSequenceClassification with these labels."""
    d = hf_config_dict(model.config)
    d["architectures"] = [CLASSIFIER_ARCH]
    d["id2label"] = {str(i): name for i, name in enumerate(labels)}
    d["label2id"] = {name: i for i, name in enumerate(labels)}
    d["pad_token_id"] = pad_token_id
    return d


def save_classifier(folder: str | Path, model: GPTClassifier, tokenizer: Tokenizer, labels: list[str], *,
                    stage: str, settings: dict, parent: str | Path | None = None, metrics: dict | None = None,
                    extra: dict | None = None) -> Manifest:
    """Write a classifier artifact atomically (GPT2ForSequenceClassification layout)."""
    if len(labels) != model.num_labels:
        raise ConfigError(f"{len(labels)} label names for a head of {model.num_labels} classes")
    folder = begin_write(folder)
    atomic_write_json(folder / "config.json", classifier_config_dict(model, labels, tokenizer.eot_id))
    tensors = to_hf_state_dict(model.gpt)
    tensors["score.weight"] = model.score.weight
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    tokenizer.save(folder)
    files = ["config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    extra = {**(extra or {}), "labels": labels}
    return finish_write(folder, stage, settings, parent=parent, metrics=metrics, files=files, extra=extra)


@dataclass
class LoadedClassifier:
    """A classifier artifact in memory (see load_classifier)."""

    model: GPTClassifier
    tokenizer: Tokenizer
    labels: list[str]
    manifest: Manifest | None
    folder: Path


def load_classifier(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> LoadedClassifier:
    """Load a classifier artifact (or a GPT2ForSequenceClassification folder from transformers).

    Raises ArtifactError for a folder that is not a GPT-2 classifier or whose files are damaged.
    """
    folder = Path(folder)
    check_complete(folder)
    path = folder / "config.json"
    if not is_classifier(folder):
        raise ArtifactError(f"{folder} is not a classifier: its config.json does not declare {CLASSIFIER_ARCH}; "
                            "pass a folder written by `compactgpt finetune --task classify`")
    d = json.loads(path.read_text(encoding="utf-8"))
    id2label = d.get("id2label") or {}
    labels = [id2label[str(i)] for i in range(len(id2label))] if all(str(i) in id2label for i in range(len(id2label))) else []
    if len(labels) < 2:
        raise ArtifactError(f"{path}: id2label must name at least 2 classes numbered from 0, got {id2label}")
    config = config_from_hf(d, str(path))
    manifest = read_manifest(folder)
    if manifest is not None and verify:
        verify_files(folder, manifest)
    # Names, float dtypes and shapes from the header, before anything is allocated.
    check_float_weights(weights_file(folder), config, extra={"score.weight": (len(labels), config.n_embd)})
    state = read_weights(folder)
    score = state.pop("score.weight", None)
    if score is None or tuple(score.shape) != (len(labels), config.n_embd):
        raise ArtifactError(f"{folder / WEIGHTS}: score.weight is missing or not ({len(labels)}, {config.n_embd})")
    gpt = GPT(config)
    try:
        gpt.load_state_dict({k: v.float() for k, v in from_hf_state_dict(state).items()}, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{folder / WEIGHTS} does not match config.json: {e}") from e
    model = GPTClassifier(gpt, len(labels))
    with torch.no_grad():
        model.score.weight.copy_(score.float())
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedClassifier(model.to(device).eval(), tokenizer, labels, manifest, folder)


def classify_texts(loaded: LoadedClassifier, texts: list[str], max_length: int | None = None) -> list[dict]:
    """[{label, probabilities}] per text."""
    max_length = max_length or loaded.model.config.n_positions
    seqs = encode_texts(loaded.tokenizer, texts, max_length)
    probs = predict(loaded.model, seqs, loaded.tokenizer.eot_id)
    out = []
    for row in probs:
        k = int(row.argmax())
        out.append({"label": loaded.labels[k],
                    "probabilities": {name: round(float(p), 6) for name, p in zip(loaded.labels, row)}})
    return out


# ---------------------------------------------------------------------------------------
# The task


def classify_split(config: FinetuneConfig) -> tuple[list[LabelledText], list[LabelledText], list[str]]:
    """(train examples, held-out examples, label names) exactly as the stage splits them;
    evaluating a classifier calls it again to rebuild the held-out set."""
    examples = read_labelled(config.data, config.text_field, config.label_field, config.columns)
    if config.val_data:
        train, val = examples, read_labelled(config.val_data, config.text_field, config.label_field, config.columns)
    else:
        tr, va = stratified_split([e.label for e in examples], config.val_fraction, config.seed)
        train, val = [examples[i] for i in tr], [examples[i] for i in va]
    labels = label_set(train, config.data)
    check_known_labels(val, labels)
    return train, val, labels


def classify_task(config: FinetuneConfig, parent: LoadedModel, log: Callable[[str], None]) -> TaskRun:
    """The classify task's TaskRun: a new head on the parent's body, cross-entropy of the
    labels, accuracy, per-class figures and the confusion matrix before and after."""
    tok = parent.tokenizer
    max_len = task_max_length(config, parent)
    train, val, labels = classify_split(config)
    index = {name: i for i, name in enumerate(labels)}
    train_y = [index[e.label] for e in train]
    val_y = [index[e.label] for e in val]
    majority, baseline = majority_baseline(train_y, val_y)
    log(f"{len(train)} training / {len(val)} held-out examples, labels {labels}; majority class "
        f"{labels[majority]!r} scores {baseline:.4f} on the held-out set")
    seqs = encode_texts(tok, [e.text for e in train], max_len)
    batches = label_batches(seqs, train_y, config.batch_size, tok.eot_id)
    torch.manual_seed(config.seed)  # the head's initial weights
    model = GPTClassifier(parent.model, len(labels))

    def report(m, phase):
        r = evaluate_examples(m, tok, val, labels, max_len)
        out = {"val_accuracy": r["accuracy"], "val_macro_f1": r["macro_f1"], "val_loss": r["loss"],
               "val_examples": r["examples"], "majority_baseline_accuracy": baseline}
        for name, stats in r["per_class"].items():
            out[f"val_recall_{safe_label(name)}"] = stats["recall"]
            out[f"val_precision_{safe_label(name)}"] = stats["precision"]
        out["confusion"] = r["confusion"]
        return out

    def evaluate(m):
        r = evaluate_examples(m, tok, val, labels, max_len)
        return {"val_accuracy": r["accuracy"], "val_loss": r["loss"]}

    def save(out, m, metrics, extra):
        save_classifier(out, m, tok, labels, stage=STAGE, settings=config.to_dict(), parent=config.model,
                        metrics=metrics, extra=extra)

    return TaskRun(model=model, batches=BucketBatches(batches), loss_fn=classification_loss, evaluate=evaluate,
                   report=report, save=save, train_also=("score",),
                   fingerprint={"data": config.data, "val_data": config.val_data, "labels": labels,
                                "max_length": max_len},
                   extra={"train_examples": len(train), "val_examples": len(val),
                          "label_counts": {l: train_y.count(i) for i, l in enumerate(labels)}})


# ---------------------------------------------------------------------------------------
# Judging a saved classifier


def heldout_examples(loaded: LoadedClassifier) -> tuple[list[LabelledText], str]:
    """(the held-out examples its finetuning used, rebuilt from the manifest's settings, and
    where they come from). Raises ConfigError when the manifest records no classify run."""
    settings = loaded.manifest.settings if loaded.manifest else {}
    if settings.get("task") != "classify":
        raise ConfigError(f"{loaded.folder} records no training data to hold out from; pass --data with labelled text")
    _, examples, _ = classify_split(config_from_settings(settings))
    return examples, f"held-out split of {settings['data']}"


def classifier_max_length(loaded: LoadedClassifier, max_length: int | None = None) -> int:
    """Tokens per text: max_length, else the length the classifier was trained at, else its
    n_positions."""
    settings = loaded.manifest.settings if loaded.manifest else {}
    return max_length or settings.get("max_length") or loaded.model.config.n_positions


def evaluate_classifier(loaded: LoadedClassifier, data: str | Path | None = None,
                        max_length: int | None = None) -> dict:
    """Accuracy, macro F1, mean loss, per-class figures and the confusion matrix of a
    classifier on labelled `data` (read with the field settings it was trained with), or on
    the held-out split its finetuning used.

    Returns {data, accuracy, macro_f1, loss, examples, per_class, confusion}. Raises
    DataError for a label the classifier was not trained on, ConfigError when no data is
    given and the manifest records none.
    """
    settings = loaded.manifest.settings if loaded.manifest else {}
    if data:
        examples = read_labelled(data, settings.get("text_field", "text"), settings.get("label_field", "label"),
                                 settings.get("columns", "auto"))
        source = str(data)
    else:
        examples, source = heldout_examples(loaded)
    check_known_labels(examples, loaded.labels)
    r = evaluate_examples(loaded.model, loaded.tokenizer, examples, loaded.labels,
                          classifier_max_length(loaded, max_length))
    return {"data": source, "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "loss": r["loss"],
            "examples": r["examples"], "per_class": r["per_class"], "confusion": r["confusion"]}
