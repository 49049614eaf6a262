"""The one export spec: tensor names, dynamic axes, opset and file names of a decoder.

Both the exporter (which names the graph's inputs and outputs) and the runtime (which feeds
them) read this module, so the two cannot disagree. Names follow Optimum's convention for
decoders, so `optimum.onnxruntime.ORTModelForCausalLM` loads a CompactGPT export as is.
"""

from __future__ import annotations

from dataclasses import dataclass

# Contrib operators (SkipLayerNormalization, FastGelu, MultiHeadAttention, MatMulNBits) live
# in this domain; ONNX Runtime implements them, other runtimes may not (see fused=False).
MS_DOMAIN = "com.microsoft"

# LayerNormalization entered the standard domain in opset 17: the unfused graph needs it.
MIN_OPSET = 17
DEFAULT_OPSET = 17
# The newest opset whose operators this exporter has been checked against.
MAX_OPSET = 21
# ONNX Runtime 1.2x reads IR versions up to 10-13; 9 is what opset 17 shipped with and is read
# by every runtime that knows opset 17.
IR_VERSION = 9

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"

# Axis names shared by every input and output.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"  # past + new tokens


@dataclass(frozen=True)
class DecoderSpec:
    """Names and shapes of one decoder graph with a KV cache (prefill and decode alike)."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"

    def past_key(self, i: int) -> str:
        """The name of layer i's cached keys fed in (past_value, present_key and
        present_value likewise)."""
        return f"past_key_values.{i}.key"

    def past_value(self, i: int) -> str:
        return f"past_key_values.{i}.value"

    def present_key(self, i: int) -> str:
        return f"present.{i}.key"

    def present_value(self, i: int) -> str:
        return f"present.{i}.value"

    @property
    def past_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (self.past_key(i), self.past_value(i))]

    @property
    def present_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (self.present_key(i), self.present_value(i))]

    @property
    def input_names(self) -> list[str]:
        return [self.input_ids, self.attention_mask, self.position_ids, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *self.present_names]

    def input_shapes(self) -> dict[str, list]:
        """Input name -> shape with named dynamic axes (ints for fixed sizes)."""
        shapes = {
            self.input_ids: [BATCH, SEQUENCE],
            self.attention_mask: [BATCH, TOTAL],
            self.position_ids: [BATCH, SEQUENCE],
        }
        for name in self.past_names:
            shapes[name] = [BATCH, self.n_head, PAST, self.head_dim]
        return shapes

    def output_shapes(self) -> dict[str, list]:
        """Output name -> shape with named dynamic axes (ints for fixed sizes)."""
        shapes = {self.logits: [BATCH, SEQUENCE, self.vocab_size]}
        for name in self.present_names:
            shapes[name] = [BATCH, self.n_head, TOTAL, self.head_dim]
        return shapes

    @classmethod
    def from_config(cls, config) -> "DecoderSpec":
        """The spec of a `compactgpt.model.GPTConfig`."""
        return cls(n_layer=config.n_layer, n_head=config.n_head, head_dim=config.head_dim,
                   vocab_size=config.vocab_size)
