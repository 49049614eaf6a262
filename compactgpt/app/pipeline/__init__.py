"""`compactgpt pipeline`: corpus -> tokenizer -> teacher (-> finetune) -> students ->
quantized variants -> ONNX exports (-> deployment bundles) -> bench -> report, stage by stage, one artifact folder
per stage under OUT.

A pipeline config is JSON with one key per stage group (unknown keys are errors):

    corpus    DataConfig fields (source, vocab_size, val_fraction, ...)
    teacher   TrainConfig fields (preset plus overrides)
    finetune  optional FinetuneConfig fields (task, data, ...), applied to the teacher
    students  [{"name", "prune": PruneConfig fields | null, "distill": DistillConfig fields}]
    quantize  [{"name", "models": [...], "method", **that method's settings}]
    export    {"models": [...], **ExportConfig fields}
    deploy    optional [{"models": [...ONNX exports], "target", **DeployConfig fields}]
    bench     {"models": [...], "baseline": NAME, **BenchConfig fields}

Each group has its planner (teacher.py, students.py, variants.py, deploy.py, benchmark.py) that builds
and checks the group's configs and adds its stages to the plan (plan.py); run.py runs them.

Resumable: every stage gets a fingerprint (its settings, minus the folders, plus its
parents' fingerprints). A stage whose folder holds a finished artifact recorded with the
same fingerprint and unchanged files is skipped; a changed setting changes that stage's
fingerprint and so every stage downstream of it; an interrupted training stage resumes from
its checkpoint when its fingerprint is unchanged and starts over otherwise.
"""

from .config import STAGE_GROUPS, default_config_path, load_config
from .plan import plan
from .run import run_pipeline, write_run_summary
from .stages import RECORD, Stage, fingerprint, is_done

__all__ = ["RECORD", "STAGE_GROUPS", "Stage", "default_config_path", "fingerprint", "is_done", "load_config",
           "plan", "run_pipeline", "write_run_summary"]
