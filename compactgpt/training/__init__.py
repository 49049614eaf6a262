"""The training loop, shared by every stage that trains (pretraining, finetuning, distillation).

`run_loop` owns what every stage needs the same way: AdamW with weight-decay groups, warmup +
cosine learning rate, gradient accumulation and clipping, bf16 autocast and optional
torch.compile on CUDA (fp32 on CPU), DDP or FSDP2 sharding under torchrun, periodic
validation, a progress bar, a JSONL metrics log, and checkpoints that hold model, optimizer,
schedule position, RNG and data-sampler state so that a resumed run continues exactly (with
any number of processes, sharded or not). A stage plugs in its own batches (`BatchSource`)
and loss (`LossFn`), and runs inside `training_stage`.

    settings.py     LoopConfig
    optimizer.py    learning-rate schedule, weight-decay groups, clipped gradient norm
    batches.py      BatchSource, LossFn, WindowBatches, lm_loss
    throughput.py   training FLOPs per token, GPU peaks (for TFLOPS and MFU in the log)
    distributed.py  device, precision, process group, FSDP2 sharding
    checkpoint.py   save, load, recover and check checkpoints
    trainer.py      what one run holds, and how it starts (or resumes)
    step.py         one optimizer step over its micro-steps
    runlog.py       the JSONL metrics log and the progress
    loop.py         run_loop
    stage.py        training_stage: the frame every training stage runs in
"""

from ..outputs import CHECKPOINT, CHECKPOINT_COMPLETE, find_checkpoint
from .batches import BatchSource, LossFn, WindowBatches, lm_loss
from .checkpoint import (LoopState, check_resume, load_checkpoint, read_checkpoint_fingerprint, recover_checkpoint,
                         save_checkpoint)
from .distributed import (TrainRuntime, cleanup_distributed, gather_full_state, scatter_full_state, setup_runtime,
                          shard_model)
from .loop import LoopResult, run_loop
from .optimizer import lr_at, param_groups
from .settings import FLOAT32_MAX, LoopConfig
from .stage import checkpoint_rule, training_stage
from .throughput import GPU_PEAK_BF16, flops_per_token, gpu_peak_flops

__all__ = ["CHECKPOINT", "CHECKPOINT_COMPLETE", "FLOAT32_MAX", "GPU_PEAK_BF16", "BatchSource", "LoopConfig",
           "LoopResult", "LoopState", "LossFn", "TrainRuntime", "WindowBatches", "check_resume", "checkpoint_rule",
           "cleanup_distributed", "find_checkpoint", "flops_per_token", "gather_full_state", "gpu_peak_flops",
           "lm_loss", "load_checkpoint", "lr_at", "param_groups", "read_checkpoint_fingerprint",
           "recover_checkpoint", "run_loop", "save_checkpoint", "scatter_full_state", "setup_runtime",
           "shard_model", "training_stage"]
