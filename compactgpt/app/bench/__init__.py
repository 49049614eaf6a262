"""`compactgpt bench`: every artifact measured the same way, PyTorch or ONNX, float or quantized.

For each model folder: perplexity through the artifact's own runtime (ONNX Runtime for an
ONNX export, PyTorch for a float or quantized artifact, on --device) on the same tokens; parameters and
file size; time to first token, decode tokens/s and prefill tokens/s for a fixed prompt and
length at batch 1 and one larger batch (warm-up runs, repeats, median and p90, fixed
threads); peak resident memory in a separate process per artifact. The machine, library
versions and the exact settings travel with every figure.

    compactgpt bench --models runs/p/teacher-onnx runs/p/student-int4-onnx --data runs/p/data --out runs/p/report

The report (report.md, report.json, PNG plots) is built by `compactgpt.app.report` from
the artifacts' manifests and these measurements alone.

Modules: config (BenchConfig), folders (kind, size, parameters of a folder), timing (the
stream timer and its statistics), memory (the peak-memory probe), measure (one artifact),
run (the stage `bench(config) -> Path`).
"""

from .config import BenchConfig
from .folders import artifact_kind, check_models, file_bytes
from .measure import eval_token_ids, measure
from .memory import peak_memory
from .run import bench, write_bench_report
from .timing import StreamTiming, percentile, time_stream

__all__ = ["BenchConfig", "StreamTiming", "artifact_kind", "bench", "check_models", "eval_token_ids", "file_bytes",
           "measure", "peak_memory", "percentile", "time_stream", "write_bench_report"]
