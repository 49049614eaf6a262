"""The bench report with rows of several runtimes: llama.cpp (GGUF) rows beside PyTorch and
ONNX Runtime ones, a runtime that ran batch 1 only, rows that could not be measured, and the
Pareto plot's labels placed clear of each other."""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from compactgpt.app.report import (MISSING, build_report, pareto_figure, place_labels, plot_pareto, render_markdown,
                                   write_report)
from compactgpt.artifacts import begin_write, finish_write, save_model
from compactgpt.errors import ConfigError

from conftest import random_gpt

SETTINGS = {"prompt_tokens": 8, "new_tokens": 8, "batch_sizes": "1,8", "warmup": 1, "repeats": 3, "threads": 2}
MACHINE = {"cpu": "test cpu", "cores": 2, "memory_gib": 1.0, "versions": {"torch": "x"}}
ABSENT = "llama-cpp-python is not installed: pip install -e '.[llamacpp]'"


def _speed(tok_s: float, batch: int = 1) -> dict:
    return {"batch": batch, "decode_tok_s": tok_s, "step_ms_median": 1e3 / tok_s, "step_ms_p90": 1.1e3 / tok_s,
            "ttft_ms_median": 5.0, "ttft_ms_p90": 6.0, "prefill_tok_s": 1000.0, "runs": 3, "steps": 30}


def _measurement(ppl: float, tok_s: float, size: int, runtime: str = "pytorch", batches=(1, 8)) -> dict:
    return {"runtime": runtime, "parameters": 1000, "file_bytes": size, "perplexity": ppl, "nll": 1.0,
            "eval": {"data": "val split", "tokens": 100, "max_length": 64, "stride": 32},
            "speed": [_speed(tok_s * b ** 0.5, b) for b in batches],
            "memory": {"peak_rss_mib": 300.0, "runtime_baseline_rss_mib": 290.0, "model_rss_mib": 10.0}}


@pytest.fixture
def folders(tmp_path, byte_tokenizer) -> dict[str, str]:
    """A teacher, a distilled student and the student's GGUF export (manifests only for the GGUF)."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    save_model(teacher, random_gpt(0), byte_tokenizer, stage="pretrain", settings={"n_layer": 2, "n_embd": 32})
    save_model(student, random_gpt(1, n_layer=1), byte_tokenizer, stage="distill", settings={"max_steps": 7},
               parent=teacher)
    gguf = begin_write(tmp_path / "student-gguf", "export")
    (gguf / "model.gguf").write_bytes(b"GGUF")
    finish_write(gguf, "export", {"format": "gguf", "gguf_type": "q8_0", "dtype": "fp32", "ort_int8": False},
                 parent=student, files=["model.gguf"])
    return {"teacher": str(teacher), "student": str(student), "student-gguf": str(gguf),
            "student-gguf-2": str(tmp_path / "elsewhere")}


def _report(folders: dict[str, str]) -> dict:
    meas = {"teacher": _measurement(20.0, 100.0, 4000),
            "student": _measurement(21.0, 300.0, 1000),
            # llama-cpp-python runs one sequence: batch 1 only
            "student-gguf": _measurement(21.2, 400.0, 900, runtime="gguf", batches=(1,)),
            "student-gguf-2": {"folder": folders["student-gguf-2"], "runtime": "gguf", "absent": ABSENT}}
    return build_report(folders, meas, SETTINGS, MACHINE)


def test_absent_row_is_listed_apart_and_kept_off_the_front_and_headline(folders, tmp_path):
    report = _report(folders)
    assert [r["name"] for r in report["rows"]] == ["teacher", "student", "student-gguf"]
    assert report["absent"] == [{"name": "student-gguf-2", "folder": folders["student-gguf-2"], "runtime": "gguf",
                                 "absent": ABSENT}]
    assert report["headline"]["name"] == "student-gguf"  # the fastest student within 10%, absent rows aside
    out = write_report(report, tmp_path / "report")
    md = (out / "report.md").read_text()
    section = md.split("## Not measured", 1)[1].split("\n## ", 1)[0]
    assert "`student-gguf-2` (llama.cpp" in section and ABSENT in section
    tables = md.split("## Not measured", 1)[0]
    assert "student-gguf-2" not in tables and "student-gguf-2" not in md.split("\n", 3)[2]  # nor the headline
    saved = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in saved["absent"]] == ["student-gguf-2"]  # report.json keeps it
    assert render_markdown(saved) == md


def test_gguf_row_reads_llama_cpp_and_a_missing_batch_reads_a_dash(folders):
    report = _report(folders)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["student-gguf"]["what"] == "GGUF q8_0 of distilled (7 steps) of teacher (2x32)"
    assert rows["student-gguf"]["x_faster"] == pytest.approx(4.0)  # at batch 1, the baseline's first
    md = render_markdown(report)
    [main] = [line for line in md.splitlines() if line.startswith("| ◆ student-gguf | GGUF")]  # on the front
    assert "| llama.cpp |" in main and "4.00x" in main
    assert "| PyTorch |" in next(line for line in md.splitlines() if "**teacher** (baseline)" in line)
    speed = [line for line in md.splitlines() if line.startswith("| student-gguf | llama.cpp |")]
    at_8 = next(line for line in speed if line.startswith("| student-gguf | llama.cpp | 8 |"))
    assert at_8.count(MISSING) == 7
    at_1 = next(line for line in speed if line.startswith("| student-gguf | llama.cpp | 1 |"))
    assert MISSING not in at_1 and "| 4.00x |" in at_1


def test_a_row_without_the_baselines_batch_stays_off_the_front(folders):
    """With batch 8 first, a llama.cpp row (batch 1 only) has no ratio, no place on the front
    and no headline; its table cells read MISSING and it is not plotted."""
    meas = {"teacher": _measurement(20.0, 100.0, 4000, batches=(8, 1)),
            "student": _measurement(21.0, 300.0, 1000, batches=(8, 1)),
            "student-gguf": _measurement(20.5, 9000.0, 900, runtime="gguf", batches=(1,))}
    report = build_report({n: folders[n] for n in meas}, meas, SETTINGS, MACHINE)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["student-gguf"]["x_faster"] is None and not rows["student-gguf"]["pareto"]
    assert report["headline"]["name"] == "student"
    line = next(x for x in render_markdown(report).splitlines() if x.startswith("| student-gguf | GGUF"))
    assert f"| {MISSING} | {MISSING} | 4.44x |" in line  # decode, x faster; x smaller is known
    fig, boxes = pareto_figure(report)
    assert set(boxes) == {"teacher", "student"}
    fig.clf()


def test_an_unmeasured_baseline_is_refused(folders):
    meas = {"teacher": {"runtime": "gguf", "absent": ABSENT}, "student": _measurement(21.0, 300.0, 1000)}
    with pytest.raises(ConfigError, match="baseline 'teacher' was not measured.*llama-cpp-python"):
        build_report({n: folders[n] for n in meas}, meas, SETTINGS, MACHINE, baseline="teacher")


def _clustered(folders: dict[str, str]) -> dict:
    """Six rows within 1% of each other on both axes, three runtimes."""
    runtimes = ["pytorch", "pytorch-quantized", "onnx", "gguf", "onnx", "gguf"]
    meas, names = {}, {}
    for i, runtime in enumerate(runtimes):
        name = ["teacher", "student-distilled-long-name", "student-onnx", "student-gguf", "onnx-int8",
                "gguf-q8"][i]
        names[name] = folders["teacher"]
        meas[name] = _measurement(20.0 * (1 + 0.002 * i), 100.0 * (1 + 0.0015 * (i % 4)), 4000 - 300 * i,
                                  runtime=runtime, batches=(1,) if runtime == "gguf" else (1, 8))
    return build_report(names, meas, SETTINGS, MACHINE)


def test_clustered_labels_do_not_overlap(folders, tmp_path):
    report = _clustered(folders)
    fig, boxes = pareto_figure(report)
    try:
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        # Measured from the figure itself, not from what the placement believed.
        texts = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        assert set(texts) == set(boxes) == {r["name"] for r in report["rows"]}
        for a, b in combinations(texts.values(), 2):
            assert not a.overlaps(b), (a, b)
        area = ax.get_window_extent(renderer)
        assert all(area.x0 <= t.x0 and t.x1 <= area.x1 and area.y0 <= t.y0 and t.y1 <= area.y1
                   for t in texts.values())
        # One legend entry per runtime present, by its readable name.
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"PyTorch", "PyTorch (int weights)", "ONNX Runtime", "llama.cpp"} <= set(legend)
        assert len(legend) == 2 + 4  # the front, the tolerance line, four runtimes
        assert len({c.get_paths()[0].vertices.tobytes() for c in ax.collections if c.get_offsets().size}) == 4
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # Deterministic: the same report places the same way, in the PNG too.
    again = plot_pareto(report, tmp_path / "pareto.png")
    assert {n: tuple(b.extents) for n, b in again.items()} == {n: tuple(b.extents) for n, b in boxes.items()}
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_place_labels_clears_markers_and_earlier_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    points = [(5.0, 5.0)] * 9 + [(5.05, 5.05)]  # more labels than directions: some go further out
    try:
        boxes = place_labels(ax, points, [f"label {i}" for i in range(10)], [6.0] * 10)
        from matplotlib.transforms import Bbox

        half = 6.0 * fig.dpi / 72  # the markers' half-side in pixels
        centres = [ax.transData.transform(p) for p in points]
        markers = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in centres]
        for a, b in combinations(boxes, 2):
            assert not a.overlaps(b)
        for box in boxes:
            assert not any(box.overlaps(m) for m in markers)
        assert len(ax.lines) >= 1  # labels moved off the first ring get a leader line
    finally:
        plt.close(fig)
