"""Finetuning data: instruction records, labelled texts, prompt templates, splits and batches.

Everything here is pure (no model): readers that name the file and line of a bad record,
the prompt template that an instruction-tuned artifact stores and `generate` reuses,
deterministic splits, and the padding / length bucketing that every finetuning task shares.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError

IGNORE_INDEX = -100  # target id that cross-entropy skips (prompt and padding positions)

# ---------------------------------------------------------------------------------------
# Records with line numbers


def _json_records(path: Path) -> list[tuple[int, object]]:
    """(line, value) for each record of a JSON array file or a JSONL file."""
    if not path.is_file():
        raise DataError(f"the data file {path} does not exist; pass an existing JSON or JSONL file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path} is empty; it should hold JSON records")
    if stripped.startswith("["):
        # Decode the array one element at a time so that errors can name a line.
        decoder = json.JSONDecoder()
        out = []
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DataError(f"{path}: the JSON array is not closed with ']'")
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: invalid JSON ({e.msg}); fix that record") from e
            out.append((line, value))
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from e
    return out


# ---------------------------------------------------------------------------------------
# Instructions and prompt templates


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str
    where: str  # file:line, for error messages and sample reports


def read_instructions(path: str | Path) -> list[Instruction]:
    """Alpaca-style records (`instruction`, optional `input`, `output`) from JSON or JSONL.

    Raises DataError naming the line and the field of a record that lacks a required key or
    holds a non-string value.
    """
    path = Path(path)
    records = []
    for line, row in _json_records(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {type(row).__name__}")
        for key in ("instruction", "output"):
            if key not in row:
                raise DataError(f"{where}: the record lacks the required field {key!r} "
                                f"(it has {sorted(row)}); every record needs 'instruction' and 'output'")
        for key in ("instruction", "input", "output"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise DataError(f"{where}: field {key!r} is {type(row[key]).__name__}, not text")
        if not row["instruction"].strip():
            raise DataError(f"{where}: field 'instruction' is empty")
        records.append(Instruction(row["instruction"], row.get("input") or "", row["output"], where))
    if not records:
        raise DataError(f"{path} holds no instruction records")
    return records


@dataclass(frozen=True)
class PromptTemplate:
    """How a record becomes text: `with_input` and `without_input` each contain the slots
    {instruction} and {response} ({input} too, in with_input), and end with {response}:
    the loss is taken on what fills that slot and `generate` stops the prompt right there."""

    with_input: str
    without_input: str

    def __post_init__(self) -> None:
        for name in ("with_input", "without_input"):
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ConfigError(f"prompt template field {name!r} must be text")
            slots = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
            allowed = {"instruction", "input", "response"} if name == "with_input" else {"instruction", "response"}
            unknown = sorted(set(slots) - allowed)
            if unknown:
                raise ConfigError(f"prompt template field {name!r} has unknown slots {unknown}; "
                                  f"it may use {sorted(allowed)}")
            if slots.count("response") != 1:
                raise ConfigError(f"prompt template field {name!r} must contain the response slot "
                                  "{response} exactly once (where the answer goes)")
            if not text.endswith("{response}"):
                raise ConfigError(f"prompt template field {name!r} must end with {{response}}: the "
                                  "answer is the last thing in a training example")
            if "instruction" not in slots:
                raise ConfigError(f"prompt template field {name!r} lacks the {{instruction}} slot")
        if "{input}" not in self.with_input:
            raise ConfigError("prompt template field 'with_input' lacks the {input} slot")

    def prompt(self, instruction: str, input: str = "") -> str:
        """The text before the response: what the model reads and continues."""
        if input.strip():
            return self.with_input[: -len("{response}")].format(instruction=instruction, input=input)
        return self.without_input[: -len("{response}")].format(instruction=instruction)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "template") -> "PromptTemplate":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a prompt template is an object with 'with_input' and 'without_input'")
        missing = [k for k in ("with_input", "without_input") if k not in d]
        if missing:
            raise ConfigError(f"{source}: the prompt template lacks the field(s) {missing}")
        unknown = sorted(set(d) - {"with_input", "without_input"})
        if unknown:
            raise ConfigError(f"{source}: unknown prompt template fields {unknown}")
        try:
            return cls(d["with_input"], d["without_input"])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")

TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        ALPACA_PREAMBLE + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}",
        ALPACA_PREAMBLE + "### Instruction:\n{instruction}\n\n### Response:\n{response}",
    ),
    # The same sections without the preamble: ~20 fewer tokens per example for small contexts.
    "compact": PromptTemplate(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}",
        "### Instruction:\n{instruction}\n\n### Response:\n{response}",
    ),
}

TEMPLATE_FILE = "prompt_template.json"


def resolve_template(spec: str) -> PromptTemplate:
    """A built-in template by name, or a JSON file with `with_input` and `without_input`."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"prompt template {spec!r} is neither a built-in ({sorted(TEMPLATES)}) nor a JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg})") from e
    return PromptTemplate.from_dict(d, str(path))


def fit_example(prompt: list[int], response: list[int], max_length: int,
                min_response: int) -> tuple[list[int], int]:
    """Prompt + response within max_length tokens; returns (ids, number of prompt tokens).

    The response's tail is cut first, down to min_response tokens; then the prompt loses its
    *beginning*, because its end (the response header) is what the response follows.
    """
    total = len(prompt) + len(response)
    if total <= max_length:
        return prompt + response, len(prompt)
    keep_response = max(min(len(response), min_response), max_length - len(prompt))
    keep_response = min(keep_response, len(response), max_length - 1)
    keep_prompt = max_length - keep_response
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt < len(prompt) else prompt
    return prompt + response[:keep_response], len(prompt)


def response_labels(ids: list[int], n_prompt: int) -> list[int]:
    """Next-token targets for ids, with every target inside the prompt ignored.

    Position t predicts ids[t + 1]; the targets of positions before n_prompt - 1 are prompt
    tokens and are ignored, as is the last position (nothing follows it).
    """
    targets = ids[1:] + [IGNORE_INDEX]
    return [IGNORE_INDEX if t < n_prompt - 1 else y for t, y in enumerate(targets)]


# ---------------------------------------------------------------------------------------
# Labelled text


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    where: str


def _detect_columns(rows: list[list[str]], text_field: str, label_field: str, columns: str,
                    source: str) -> tuple[int, int, bool]:
    """(text column, label column, has header) for a CSV/TSV table."""
    if columns != "auto":
        names = [c.strip() for c in columns.split(",")]
        if sorted(names) != ["label", "text"]:
            raise ConfigError(f"--columns must name the two columns 'text' and 'label' in file order "
                              f"(e.g. label,text), got {columns!r}")
        return names.index("text"), names.index("label"), False
    header = [c.strip() for c in rows[0]]
    if text_field in header and label_field in header:
        return header.index(text_field), header.index(label_field), True
    if any(len(r) != 2 for r in rows[:1000]):
        raise DataError(f"{source}: no header with {text_field!r} and {label_field!r}, and rows are not "
                        "two columns; add a header row or pass --columns (e.g. label,text)")
    # Without a header, the label is the column with fewer distinct values.
    distinct = [len({r[i] for r in rows}) for i in (0, 1)]
    label_col = 0 if distinct[0] <= distinct[1] else 1
    return 1 - label_col, label_col, False


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label",
                  columns: str = "auto") -> list[LabelledText]:
    """Labelled texts from TSV (also extension-less tab-separated files), CSV or JSON/JSONL.

    CSV/TSV: a header naming text_field and label_field, or two columns without a header
    (the label column is the one with fewer distinct values, unless --columns says).
    Raises DataError naming the line of an empty label or text, or a short row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the data file {path} does not exist; pass a TSV, CSV or JSONL file of text and label")
    suffix = path.suffix.lower()
    out: list[LabelledText] = []
    if suffix in (".jsonl", ".json"):
        for line, row in _json_records(path):
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with {text_field!r} and {label_field!r}")
            for key in (text_field, label_field):
                if key not in row:
                    raise DataError(f"{where}: the record lacks the field {key!r}; pass --text-field / "
                                    "--label-field to name the fields that hold the text and the label")
            out.append(_labelled(row[text_field], row[label_field], where, label_field))
        if not out:
            raise DataError(f"{path} holds no records")
        return out
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text))
    else:
        # Tab-separated text quotes nothing: a '"' inside a message is part of the message.
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows, lines = [], []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        rows.append(row)
        lines.append(reader.line_num)
    if not rows:
        raise DataError(f"{path} holds no rows")
    text_col, label_col, header = _detect_columns(rows, text_field, label_field, columns, str(path))
    for row, line in list(zip(rows, lines))[1 if header else 0:]:
        where = f"{path}:{line}"
        if len(row) <= max(text_col, label_col):
            sep = "commas" if suffix == ".csv" else "tabs"
            raise DataError(f"{where}: the row has {len(row)} column(s), expected text and label separated by {sep}")
        out.append(_labelled(row[text_col], row[label_col], where, label_field))
    if not out:
        raise DataError(f"{path} holds a header but no rows")
    return out


def _labelled(text, label, where: str, label_field: str) -> LabelledText:
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{where}: the label ({label_field!r}) is empty; every example needs a label")
    if not isinstance(label, (str, int, bool)):
        raise DataError(f"{where}: the label is {type(label).__name__}; labels are text or integers")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the text is empty or not text")
    return LabelledText(text, str(label).strip(), where)


def label_set(examples: list[LabelledText], source: str) -> list[str]:
    """Sorted label names; at least two classes are required."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise DataError(f"{source}: every example has the label {labels[0]!r}; a classifier needs at "
                        "least two classes in its training data")
    return labels


def check_known_labels(examples: list[LabelledText], labels: list[str]) -> None:
    """Raise DataError at the first example whose label the classifier was not trained on."""
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise DataError(f"{e.where}: label {e.label!r} was not in the training labels {labels}; "
                            "held-out data may only use labels the classifier was trained on")


# ---------------------------------------------------------------------------------------
# Splits


def random_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle split of range(n) into (train, val), both non-empty."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if n < 2:
        raise DataError(f"need at least 2 examples to hold one out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def stratified_split(labels: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices holding out val_fraction of every class (rounded), so the held-out
    class balance matches the data's. A class with a single example stays in training."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, val = [], []
    for label in sorted(by_class):
        idx = by_class[label]
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------------------
# Batching


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, then cut), so that
    padding wastes little compute. Ties keep their original order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(seqs: list[list[int]], pad_id: int, value_pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with pad_id (or value_pad), and the 1/0 attention mask."""
    width = max(len(s) for s in seqs)
    fill = pad_id if value_pad is None else value_pad
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class BucketBatches:
    """A BatchSource over pre-built, length-bucketed batches: each draw picks a random
    bucket with the loop's generator, so a resumed run draws the same batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]]):
        if not batches:
            raise DataError("no training batches: the training split is empty")
        self.batches = batches

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.batches[int(torch.randint(len(self.batches), (1,), generator=generator))]


_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_label(label: str) -> str:
    """A label as it may appear in a metric name."""
    return _SLUG.sub("_", label)[:40] or "_"
