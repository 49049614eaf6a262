"""Bad numbers on the command line are refused while the flags are parsed (exit status 2, the
flag named, no traceback), never accepted silently (issue 15); a quantized folder is run by
`generate` and named as such where a float model is needed."""

from __future__ import annotations

import pytest

from compactgpt.app.cli import main
from compactgpt.artifacts import save_model
from conftest import random_gpt


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from compactgpt.tokenizer import train_bpe
    from quantize import QuantizeConfig, quantize_folder
    from quantize.config import RTNConfig

    root = tmp_path_factory.mktemp("ranges")
    tok = train_bpe(["hello world\n", "def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_model(root / "float", random_gpt(), tok, stage="test", settings={})
    quantize_folder(QuantizeConfig(model=str(root / "float"), out=str(root / "quant"), progress=False,
                                   method=RTNConfig(bits=4, group_size=0)), log=lambda m: None)
    return root


BAD_FLAGS = [
    ("generate", "--top-k", "-5"),
    ("generate", "--temperature", "nan"),
    ("generate", "--temperature", "-1"),
    ("generate", "--top-p", "0"),
    ("generate", "--top-p", "inf"),
    ("generate", "--max-new-tokens", "-1"),
    ("generate", "--max-new-tokens", "0"),  # asking for nothing is refused, not answered with the prompt
    ("generate", "--seed", "-3"),
    ("generate", "--repetition-penalty", "-1"),
    ("generate", "--threads", "0"),
    ("eval", "--threads", "-1"),
    ("eval", "--max-length", "0"),
    ("eval", "--stride", "0"),
    ("tokenize", "--vocab-size", "-2"),
    ("tokenize", "--val-fraction", "1.5"),
    ("quantize", "--threads", "0"),
    ("classify", "--threads", "-4"),
    ("pretrain", "--lr", "nan"),
    ("export", "--atol", "inf"),
]


@pytest.mark.parametrize("verb,flag,value", BAD_FLAGS)
def test_a_bad_number_is_a_parse_error_naming_the_flag(folders, capsys, verb, flag, value):
    argv = {"generate": ["--model", folders / "float"], "eval": ["--model", folders / "float"],
            "tokenize": ["--out", folders / "never"], "quantize": ["--model", folders / "float", "--out",
                                                                   folders / "never", "--method", "rtn"],
            "classify": ["--model", folders / "float"], "pretrain": [], "export": []}[verb]
    with pytest.raises(SystemExit) as e:
        main([verb, *map(str, argv), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"error: argument {flag}: must be" in err and value in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--preset", "tiny", "--n-layer", "0"], "n_layer must be a positive integer"),
    (["pretrain", "--preset", "tiny", "--beta2", "1.5"], "beta2=1.5"),
    (["prune", "--model", "m", "--out", "o", "--calib-samples", "0"], "--calib-samples must be positive"),
    (["sparsify", "--model", "m", "--out", "o", "--val-fraction", "0"], "--val-fraction must be between 0 and 1"),
    (["distill", "--teacher", "t", "--student", "n_layer=1", "--seed", "-1"], "seed must be an integer from 0"),
])
def test_a_config_field_out_of_range_is_a_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_runs_a_quantized_folder(folders, capsys):
    assert main(["generate", "--model", str(folders / "quant"), "--max-new-tokens", "4", "--temperature", "0",
                 "--prompt", "def"]) == 0
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.parametrize("verb,argv", [
    ("quantize", ["--method", "rtn", "--out", "OUT"]),
    ("prune", ["--layers", "1", "--out", "OUT"]),
    ("sparsify", ["--out", "OUT"]),
])
def test_a_quantized_folder_where_a_float_one_is_needed_is_named(folders, capsys, verb, argv):
    out = str(folders / f"never-{verb}")
    argv = [out if a == "OUT" else a for a in argv]
    assert main([verb, "--model", str(folders / "quant"), *argv]) == 2
    err = capsys.readouterr().err
    assert "is already quantized with rtn" in err and str((folders / "float").resolve()) in err
    assert "different models" not in err and err.count("\n") == 1


def test_generate_with_a_repetition_penalty_prints_the_loops_tokens(folders, capsys):
    import torch

    from compactgpt.artifacts import load_model

    loaded = load_model(folders / "float")
    ids = loaded.tokenizer.encode("def")
    eot = loaded.tokenizer.eot_id
    want = loaded.model.generate(torch.tensor([ids]), 12, repetition_penalty=1.8, stop_tokens=(eot,))
    new = [t for t in want[0, len(ids):].tolist() if t != eot]
    assert main(["generate", "--model", str(folders / "float"), "--max-new-tokens", "12", "--temperature", "0",
                 "--repetition-penalty", "1.8", "--prompt", "def"]) == 0
    assert capsys.readouterr().out == "def" + loaded.tokenizer.decode(new) + "\n"
    assert main(["generate", "--model", str(folders / "float"), "--repetition-penalty", "0"]) == 2
    err = capsys.readouterr().err
    assert "repetition_penalty must be > 0" in err and "Traceback" not in err
