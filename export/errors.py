"""The errors of the export stage, one type per way an export can be wrong.

Checks run in the order Optimum's exporter runs them: the graph's signature first (input and
output names, then dynamic axes, all against `export.spec`), then the values, output by
output. A failure names the tensor, so a renamed output reads as a renamed output and not
as a wrong number.
"""

from __future__ import annotations

from compactgpt.errors import CompactGPTError


class ExportError(CompactGPTError):
    """An export that cannot be built as asked (an operator the opset lacks, a layout
    MatMulNBits cannot hold, ...)."""


class SignatureError(ExportError):
    """The graph's inputs or outputs disagree with `export.spec`: the runtime, Optimum and
    onnxruntime-genai, which feed it by those names and axes, could not drive it."""


class InputNameError(SignatureError):
    """The graph lacks an input the spec names, or has one the spec does not."""


class OutputNameError(SignatureError):
    """The graph lacks an output the spec names, or has one the spec does not."""


class AxisError(SignatureError):
    """A tensor's rank or axes disagree with the spec: an axis the spec makes dynamic (batch,
    sequence, past) is fixed in the graph, or a fixed size differs."""


class OutputShapeError(SignatureError):
    """An output computed by ONNX Runtime has another shape than PyTorch's for the same input."""


class ParityError(CompactGPTError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance: the export is wrong."""
