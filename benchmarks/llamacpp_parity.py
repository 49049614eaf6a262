"""llama.cpp against PyTorch on one float model: its tokenization of held-out text and its logits
on a few prompts, from the model's F32 GGUF export.

    python -m benchmarks.llamacpp_parity --model runs/pipeline/teacher --data runs/pipeline/data

Tokenization: every document of the data folder's val split (decoded from its tokens) tokenized by
llama.cpp and by CompactGPT, document by document (a document boundary is the <|endoftext|> token,
which text would only spell). Logits: max |llama.cpp - PyTorch| over every position of three
prompts, with llama.cpp's KV cache in float32 and in its default float16, and once more with
PyTorch computing GELU as ggml's CPU backend does (input and result rounded to fp16, its
GGML_GELU_FP16 table): what is left then is float32 summation order. Needs llama-cpp-python
(pip install -e '.[llamacpp]'). Writes benchmarks/results/llamacpp_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compactgpt.artifacts import load_model
from compactgpt.calibration import data_folder_tokens
from compactgpt.machine import machine_info
from export.llamacpp import ggml_gelu

RESULTS = Path(__file__).parent / "results"
PROMPTS = ("def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n",
           "import os\nimport sys\n\n\nclass Reader:\n    \"\"\"Read records from a file.\"\"\"\n",
           "    for i, item in enumerate(items):\n        if item is None:\n            continue\n")


def tokenization(gguf: Path, tokenizer, val: torch.Tensor) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    docs = [d for d in tokenizer.decode(val.tolist()).split("<|endoftext|>") if d]
    equal = tokens = 0
    for doc in docs:
        ours = tokenizer.encode(doc)
        tokens += len(ours)
        equal += llm.tokenize(doc.encode(), add_bos=False, special=False) == ours
    return {"documents": len(docs), "documents_equal": equal, "tokens": tokens}


def logits(gguf: Path, model, tokenizer, threads: int) -> list[dict]:
    from llama_cpp import Llama

    n, V = model.config.n_positions, tokenizer.vocab_size
    rows = []
    for kv, types in (("float32", {"type_k": 0, "type_v": 0}), ("float16 (default)", {})):
        llm = Llama(model_path=str(gguf), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=threads,
                    **types)
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)])[:, :V]
            row = {"kv_cache": kv, "tokens": len(ids), "logit_abs_max": float(np.abs(theirs).max())}
            for name, act in (("max_abs_diff", lambda x: F.gelu(x, approximate="tanh")),
                              ("max_abs_diff_ggml_gelu", ggml_gelu)):
                for block in model.transformer.h:
                    block.mlp.act = act
                with torch.no_grad():
                    ours = model(torch.tensor([ids])).logits[0, :, :V].numpy()
                row[name] = float(np.abs(theirs - ours).max())
            rows.append(row)
        llm.close()
    return rows


def markdown(r: dict) -> str:
    t = r["tokenization"]
    out = [f"# llama.cpp against PyTorch: {r['model']}", "",
           f"Machine: {r['machine']['cpu']}, {r['threads']} threads; llama-cpp-python {r['llama_cpp_python']}; "
           f"torch {r['machine']['versions']['torch']}. F32 GGUF export of the model.", "",
           f"Tokenization: {t['documents_equal']} of {t['documents']} held-out documents ({t['tokens']:,} tokens) "
           "tokenized identically by llama.cpp and CompactGPT.", "",
           "| KV cache | prompt tokens | max abs logit | max abs diff | same, PyTorch with ggml's fp16 GELU |",
           "|---|---|---|---|---|"]
    out += [f"| {x['kv_cache']} | {x['tokens']} | {x['logit_abs_max']:.1f} | {x['max_abs_diff']:.2e} | "
            f"{x['max_abs_diff_ggml_gelu']:.2e} |" for x in r["logits"]]
    out += ["", "The last column computes GELU in PyTorch as ggml's CPU backend does (GGML_GELU_FP16: input and "
            "result rounded to fp16): with the float32 KV cache what remains is float32 summation order; the "
            "float16 cache adds its own rounding of every key and value."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a float CompactGPT model folder (e.g. runs/pipeline/teacher)")
    ap.add_argument("--data", required=True, help="its prepared data folder (the val split is the held-out text)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    ap.add_argument("--out", default=str(RESULTS / "llamacpp_parity"), help="results path without extension")
    args = ap.parse_args()
    from export import ExportConfig, export

    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    val = data_folder_tokens(Path(args.data), tokenizer, "the model", split="val")
    with tempfile.TemporaryDirectory() as tmp:
        out = export(ExportConfig(model=args.model, out=f"{tmp}/gguf", format="gguf"), log=lambda m: None)
        gguf = out / "model.gguf"
        result = {"model": Path(args.model).name, "machine": machine_info(), "threads": args.threads,
                  "llama_cpp_python": metadata.version("llama-cpp-python"),
                  "tokenization": tokenization(gguf, tokenizer, val),
                  "logits": logits(gguf, model, tokenizer, args.threads)}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
