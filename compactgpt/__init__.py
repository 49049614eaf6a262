"""CompactGPT: turn a GPT language model into small, fast models that run on devices.

The pipeline: text -> tokenizer and token shards -> teacher GPT -> students (pruning +
distillation) -> quantized students -> ONNX with KV cache -> benchmark report. Every stage
reads and writes a self-describing artifact folder.
"""

from .artifacts import LoadedModel, load_model, save_model
from .errors import ArtifactError, CompactGPTError, ConfigError, DataError
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, train_bpe

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "Tokenizer", "train_bpe", "load_model", "save_model", "LoadedModel",
    "CompactGPTError", "ArtifactError", "ConfigError", "DataError", "__version__",
]
