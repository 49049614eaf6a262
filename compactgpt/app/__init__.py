"""The application layer: the `compactgpt` command, the pipeline, bench and its report.

It sits on top of the core (compactgpt.model, .data, .artifacts, .training, ...) and the
stages (compactgpt.pretrain, compactgpt.finetune, distill, quantize, export), and is the only
code that imports every stage. Nothing below it imports it.
"""
