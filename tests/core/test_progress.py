"""Progress is a bar on a terminal and plain lines in a log, never redraws in a file."""

from __future__ import annotations

from compactgpt.pretrain import config_from_preset, pretrain
from compactgpt.progress import progress_bar, progress_wanted


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("COMPACTGPT_PROGRESS", raising=False)
    assert not progress_wanted()  # pytest's captured stderr is not a terminal
    assert not progress_wanted(requested=False)
    monkeypatch.setenv("COMPACTGPT_PROGRESS", "1")
    assert progress_wanted() and not progress_wanted(requested=False)
    monkeypatch.setenv("COMPACTGPT_PROGRESS", "0")
    assert not progress_wanted()
    assert list(progress_bar(range(3), desc="x")) == [0, 1, 2]  # a silent bar still iterates


def test_training_off_a_terminal_logs_plain_lines(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMPACTGPT_PROGRESS", raising=False)
    lines: list[str] = []
    config = config_from_preset("tiny", data=str(data_dir), out=str(tmp_path / "t"), n_positions=64, block_size=32,
                                batch_size=4, max_steps=6, warmup_steps=1, eval_interval=3, log_interval=2,
                                eval_batches=2, checkpoint_interval=100)
    pretrain(config.replace(progress=True), log=lines.append)
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws written into a log
    steps = [line for line in lines if line.startswith("pretrain step ")]
    assert [s.split(":")[0] for s in steps if "tok_s" in s] == ["pretrain step 2/6", "pretrain step 4/6",
                                                                "pretrain step 6/6"]
    assert any("val_ppl" in s for s in steps)


def test_no_progress_means_no_lines(data_dir, tmp_path):
    lines: list[str] = []
    config = config_from_preset("tiny", data=str(data_dir), out=str(tmp_path / "q"), n_positions=64, block_size=32,
                                batch_size=4, max_steps=2, warmup_steps=1, eval_interval=2, log_interval=1,
                                eval_batches=2, checkpoint_interval=100)
    pretrain(config.replace(progress=False), log=lines.append)
    assert not [line for line in lines if line.startswith("pretrain step ")]
