"""The layers hold: data and imports flow one way, core -> stages -> application.

Two checks. A static one reads every import statement of the project (function-level
imports included) and asserts the direction and the absence of cycles. A dynamic one
imports the lower layers in a fresh interpreter and asserts that nothing above them got
loaded, and that light verbs stay light (no ONNX, bitsandbytes or matplotlib for `info`).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compactgpt", "distill", "quantize", "export")

# The stages in pipeline order: each may import the core and the stages before it.
STAGES = ("compactgpt.pretrain", "compactgpt.finetune", "distill", "quantize", "export")
APP = "compactgpt.app"


def layer_of(module: str) -> tuple[str, int]:
    """("core", 0), ("stage", i) or ("app", 0) for a project module name."""
    # `python -m compactgpt` runs the CLI: its __main__ is part of the application.
    if module == APP or module.startswith(APP + ".") or module == "compactgpt.__main__":
        return "app", 0
    for i, stage in enumerate(STAGES):
        if module == stage or module.startswith(stage + "."):
            return "stage", i
    if module.startswith("compactgpt"):
        return "core", 0
    raise AssertionError(f"{module} belongs to no layer; add its package to STAGES or the core")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `module` imports anywhere in its file, resolved to the longest
    known module name (`from quantize import load_quantized` -> quantize)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_import_points_down(graph):
    wrong = []
    for module, targets in graph.items():
        kind, index = layer_of(module)
        for target in targets:
            t_kind, t_index = layer_of(target)
            if kind == "core" and t_kind != "core":
                wrong.append(f"core module {module} imports {t_kind} module {target}")
            elif kind == "stage" and t_kind == "app":
                wrong.append(f"stage module {module} imports the application ({target})")
            elif kind == "stage" and t_kind == "stage" and t_index > index:
                wrong.append(f"stage module {module} imports the later stage {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The static check is only worth something if it can fail: a core module that imports
    the CLI is reported."""
    modules = {"compactgpt.data": tmp_path / "data.py", "compactgpt.app.cli": tmp_path / "cli.py"}
    modules["compactgpt.data"].write_text("def f():\n    from .app.cli import main\n")
    modules["compactgpt.app.cli"].write_text("")
    assert imports_of("compactgpt.data", modules["compactgpt.data"], modules) == {"compactgpt.app.cli"}
    assert layer_of("compactgpt.app.cli") == ("app", 0) and layer_of("compactgpt.data") == ("core", 0)


def loaded_after(code: str) -> set[str]:
    """The modules loaded by running `code` in a fresh interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_lower_layers_load_nothing_above_them():
    core = ("compactgpt", "compactgpt.model", "compactgpt.tokenizer", "compactgpt.data", "compactgpt.artifacts",
            "compactgpt.lineage", "compactgpt.evaluation", "compactgpt.training", "compactgpt.config")
    loaded = loaded_after("\n".join(f"import {m}" for m in core))
    assert not {m for m in loaded if m.startswith(STAGES + (APP,))}, "the core loaded a stage or the application"
    loaded = loaded_after("\n".join(f"import {m}" for m in core + STAGES[:-1]))
    assert not {m for m in loaded if m == "export" or m.startswith("export.")}, "a stage below export loaded it"
    loaded = loaded_after("\n".join(f"import {m}" for m in core + STAGES))
    assert not {m for m in loaded if m.startswith(APP)}, "a stage loaded the application"


def test_info_and_help_stay_light(tmp_path):
    heavy = ("onnx", "onnxruntime", "bitsandbytes", "matplotlib", "optimum", "transformers")
    from compactgpt.data import DataConfig, prepare_data

    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    prepare_data(DataConfig(source=str(tmp_path / "c.txt"), vocab_size=280, val_fraction=0.5, out=str(tmp_path / "d")),
                 log=lambda m: None)
    for argv in (["info", str(tmp_path / "d")], ["--help"], ["quantize", "--help"]):
        code = ("import sys\nfrom compactgpt.app.cli import main\n"
                f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
        loaded = loaded_after(code)
        assert not {m for m in loaded if m.split(".")[0] in heavy}, f"compactgpt {' '.join(argv)} loaded a heavy library"
