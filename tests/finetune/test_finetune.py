"""Finetuning: response-only loss, the last-token classification head, LoRA merging, data
readers and their errors, and the three tasks end to end on tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F

from compactgpt.app.cli import main
from compactgpt.artifacts import resolved_parent, load_model, read_manifest, save_model
from compactgpt.errors import ConfigError, DataError
from compactgpt.finetune import FinetuneConfig, evaluate_classifier, finetune
from compactgpt.finetune.classify import (GPTClassifier, classification_report, last_token_index,
                                          load_classifier, save_classifier)
from compactgpt.finetune.data import (IGNORE_INDEX, TEMPLATES, PromptTemplate, check_known_labels, fit_example,
                                      label_set, length_batches, read_instructions, read_labelled,
                                      response_labels, stratified_split)
from compactgpt.finetune.instruct import response_loss, response_loss_sum
from compactgpt.finetune.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters
from conftest import SHARED_DATA, random_gpt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy
    # second core makes the other thread's waits dominate.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# Response-only loss


def test_response_labels_ignore_every_prompt_target():
    ids = [5, 6, 7, 8, 9, 10]
    assert response_labels(ids, n_prompt=3) == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10, IGNORE_INDEX]


def test_changing_a_prompt_tokens_target_does_not_change_the_loss():
    model = random_gpt(0)
    ids = torch.randint(0, 300, (12,)).tolist()
    n_prompt = 7
    logits = model(torch.tensor([ids])).logits
    loss = lambda labels: response_loss_sum(logits, torch.tensor([labels]))[0]
    base = loss(response_labels(ids, n_prompt))
    for k in range(1, n_prompt):  # every prompt token after the first is some position's target
        other = list(ids)
        other[k] = (ids[k] + 1) % 300
        assert torch.equal(loss(response_labels(other, n_prompt)), base)
    # Control: the targets of the response do count.
    other = list(ids)
    other[n_prompt + 1] = (ids[n_prompt + 1] + 1) % 300
    assert not torch.equal(loss(response_labels(other, n_prompt)), base)
    # And the loss is exactly the cross-entropy over the response targets.
    manual = F.cross_entropy(logits[0, n_prompt - 1: -1], torch.tensor(ids[n_prompt:]), reduction="sum")
    torch.testing.assert_close(base, manual)


def test_response_loss_is_the_same_with_right_padding():
    model = random_gpt(1)
    ids = torch.randint(0, 300, (10,)).tolist()
    labels = response_labels(ids, 6)
    one = response_loss(model, (torch.tensor([ids]), torch.ones(1, 10, dtype=torch.long), torch.tensor([labels])))
    padded_ids = torch.tensor([ids + [0] * 5])
    padded_labels = torch.tensor([labels + [IGNORE_INDEX] * 5])
    mask = torch.tensor([[1] * 10 + [0] * 5])
    two = response_loss(model, (padded_ids, mask, padded_labels))
    torch.testing.assert_close(one[0], two[0])
    assert one[1] == two[1] == 10  # real tokens read, padding not counted


def test_fit_example_cuts_the_response_then_the_prompts_beginning():
    prompt, response = list(range(10)), list(range(100, 120))
    ids, n = fit_example(prompt, response, 40, 8)
    assert ids == prompt + response and n == 10
    ids, n = fit_example(prompt, response, 25, 8)
    assert ids == prompt + response[:15] and n == 10
    ids, n = fit_example(prompt, response, 12, 8)  # the prompt keeps its end (the response header)
    assert n == 4 and ids == prompt[6:] + response[:8]


# ---------------------------------------------------------------------------------------
# Classification head


def test_last_token_index_is_the_rightmost_real_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_the_head_reads_the_last_non_padding_token():
    torch.manual_seed(0)
    clf = GPTClassifier(random_gpt(2), 3).eval()
    ids = torch.randint(1, 300, (1, 6))
    alone = clf(ids)
    for pad in (0, 17, 299):
        padded = torch.cat([ids, torch.full((1, 4), pad)], dim=1)
        mask = torch.tensor([[1] * 6 + [0] * 4])
        torch.testing.assert_close(clf(padded, mask), alone)
    # It is the score of the hidden state at that token: not the first, not the mean.
    hidden = clf.gpt(ids).logits
    torch.testing.assert_close(alone, clf.score(hidden[:, -1]))
    assert not torch.allclose(alone, clf.score(hidden[:, 0]), atol=1e-4)


def test_classifier_artifact_loads_in_transformers_with_the_same_logits(tmp_path, byte_tokenizer):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    clf = GPTClassifier(random_gpt(3), 2).eval()
    with torch.no_grad():
        clf.score.weight.normal_()
    save_classifier(tmp_path / "clf", clf, byte_tokenizer, ["ham", "spam"], stage="finetune", settings={})
    pad = byte_tokenizer.eot_id
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, pad, pad]])
    mask = (ids != pad).long()
    ours = clf(ids, mask)
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.labels == ["ham", "spam"]
    torch.testing.assert_close(loaded.model(ids, mask), ours)
    assert read_manifest(tmp_path / "clf").extra["labels"] == ["ham", "spam"]


def test_classification_report_counts():
    r = classification_report([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["a", "b"])
    assert r["confusion"]["matrix"] == [[1, 1], [1, 2]]
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["per_class"]["b"]["precision"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------
# LoRA


def test_lora_starts_at_the_base_model_and_merges_to_the_same_logits():
    model = random_gpt(4)
    ids = torch.randint(0, 300, (2, 9))
    base = model(ids).logits
    n = apply_lora(model, rank=4, alpha=8.0)
    assert n == 2 * 4  # four projections per block, two blocks
    torch.testing.assert_close(model(ids).logits, base)  # B starts at zero
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.5)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_the_adapters_and_named_heads():
    torch.manual_seed(0)
    clf = GPTClassifier(random_gpt(5), 2)
    total_before = trainable_parameters(clf)[1]
    apply_lora(clf, rank=2, alpha=4.0, train_also=("score",))
    trainable, total = trainable_parameters(clf)
    per_block = 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert trainable == 2 * per_block + clf.score.weight.numel()
    assert total == total_before + 2 * per_block
    loss = clf(torch.randint(0, 300, (2, 5))).sum()
    loss.backward()
    assert clf.gpt.transformer.wte.weight.grad is None
    assert clf.gpt.transformer.h[0].attn.c_attn.lora_b.grad is not None


def test_lora_with_no_matching_target_is_an_error():
    with pytest.raises(ConfigError, match="LoRA targets"):
        apply_lora(random_gpt(0), 2, 4.0, targets=("nothing",))


# ---------------------------------------------------------------------------------------
# Data readers and bad input


def test_instruction_entry_without_a_required_key_names_line_and_field(tmp_path):
    path = tmp_path / "inst.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}], indent=2))
    with pytest.raises(DataError, match=r"inst\.json:6.*'output'"):
        read_instructions(path)
    jsonl = tmp_path / "inst.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n{"output": "b"}\n')
    with pytest.raises(DataError, match=r"inst\.jsonl:2.*'instruction'"):
        read_instructions(jsonl)


def test_template_without_response_slot_is_an_error():
    with pytest.raises(ConfigError, match="response slot"):
        PromptTemplate("Q: {instruction} {input}\nA:", "Q: {instruction}\nA: {response}")
    with pytest.raises(ConfigError, match="end with"):
        PromptTemplate("{instruction} {input} {response} thanks", "{instruction} {response}")
    t = TEMPLATES["alpaca"]
    assert t.prompt("Add 2 and 2.").endswith("### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    assert "### Input:\nx" in t.prompt("Do it.", "x")


def test_empty_label_names_its_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("ham\thello there\nspam\twin money\n\tno label here\n")
    with pytest.raises(DataError, match=r"d\.tsv:3.*label.*empty"):
        read_labelled(path)


def test_single_class_and_unseen_labels_are_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,ham\n\"hi, you\",ham\n")
    examples = read_labelled(path)
    assert examples[1].text == "hi, you"
    with pytest.raises(DataError, match="at least two classes"):
        label_set(examples, str(path))
    val = tmp_path / "v.jsonl"
    val.write_text('{"text": "x", "label": "ham"}\n{"text": "y", "label": "eggs"}\n')
    with pytest.raises(DataError, match=r"v\.jsonl:2.*'eggs'.*not in the training labels"):
        check_known_labels(read_labelled(val), ["ham", "spam"])


def test_headerless_tsv_finds_the_label_column(tmp_path):
    path = tmp_path / "sms"
    rows = [("ham", f"message number {i} \"quoted\"") for i in range(8)] + [("spam", "win a prize now")]
    path.write_text("".join(f"{l}\t{t}\n" for l, t in rows))
    examples = read_labelled(path)
    assert [e.label for e in examples] == [l for l, _ in rows]
    assert examples[0].text == 'message number 0 "quoted"'


def test_stratified_split_keeps_the_class_balance():
    labels = ["a"] * 90 + ["b"] * 10
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(100))
    assert sum(labels[i] == "b" for i in val) == 2 and len(val) == 20
    assert stratified_split(labels, 0.2, seed=0) == (train, val)


def test_length_batches_group_similar_lengths():
    batches = length_batches([5, 1, 9, 2, 8, 3], 2)
    assert batches == [[1, 3], [5, 0], [4, 2]]


@pytest.mark.skipif(not (SHARED_DATA / "instruction" / "instruction-data.json").is_file(), reason="no shared data")
def test_real_instruction_data_reads():
    records = read_instructions(SHARED_DATA / "instruction" / "instruction-data.json")
    assert len(records) == 1100 and all(r.output for r in records)


@pytest.mark.skipif(not (SHARED_DATA / "sms-spam" / "SMSSpamCollection").is_file(), reason="no shared data")
def test_real_sms_data_reads():
    examples = read_labelled(SHARED_DATA / "sms-spam" / "SMSSpamCollection")
    assert len(examples) == 5574 and {e.label for e in examples} == {"ham", "spam"}


# ---------------------------------------------------------------------------------------
# The stage end to end on a tiny random model


@pytest.fixture
def parent(tmp_path, byte_tokenizer):
    folder = tmp_path / "parent"
    save_model(folder, random_gpt(0, n_positions=96), byte_tokenizer, stage="pretrain", settings={})
    return folder


def _quick(**kw):
    base = dict(max_steps=40, batch_size=8, warmup_steps=2, eval_interval=40, checkpoint_interval=40, log_interval=10,
                device="cpu", eval_samples=1, sample_tokens=8, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_instruct_lowers_heldout_response_loss_and_stores_the_template(tmp_path, parent, capsys):
    records = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}"}
               for w in ("hello", "world", "value", "def", "return", "x", "self", "data")] * 4
    data = tmp_path / "inst.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "chat"
    finetune(_quick(model=str(parent), task="instruct", data=str(data), out=str(out), lr=3e-3, template="compact"),
             log=lambda m: None)
    metrics = read_manifest(out).metrics
    assert metrics["val_response_ppl"] < metrics["before_val_response_ppl"]
    manifest = read_manifest(out)
    assert manifest.stage == "finetune" and manifest.extra["task"] == "instruct"
    assert resolved_parent(out, manifest) == parent.resolve()
    assert manifest.extra["samples"][0]["after"] is not None
    assert load_model(out).model.config.n_positions == 96  # an ordinary LM artifact
    assert json.loads((out / "prompt_template.json").read_text()) == TEMPLATES["compact"].to_dict()
    code = main(["generate", "--model", str(out), "--prompt", "Say x twice.", "--temperature", "0",
                 "--max-new-tokens", "6"])
    assert code == 0
    assert "### Instruction" not in capsys.readouterr().out  # the template is applied, not echoed
    # eval without --data scores the held-out split the stage used, as the stage did.
    assert main(["eval", "--model", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_response_ppl"] == pytest.approx(metrics["val_response_ppl"], rel=1e-5)


def _labelled_file(tmp_path):
    rows = [("pos", f"{i} hello world") for i in range(30)] + [("neg", f"{i} def return x") for i in range(30)]
    path = tmp_path / "labels.tsv"
    path.write_text("label\ttext\n" + "".join(f"{l}\t{t}\n" for l, t in rows))
    return path


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_classify_learns_and_eval_reports_accuracy(tmp_path, parent, capsys, lora_rank):
    data = _labelled_file(tmp_path)
    out = tmp_path / "clf"
    finetune(_quick(model=str(parent), task="classify", data=str(data), out=str(out),
                    lr=1e-2 if lora_rank else 3e-3, lora_rank=lora_rank, val_fraction=0.2), log=lambda m: None)
    metrics = read_manifest(out).metrics
    assert metrics["val_accuracy"] == 1.0
    assert metrics["majority_baseline_accuracy"] == 0.5
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 12
    if lora_rank:
        assert metrics["trainable_fraction"] < 0.2
    assert read_manifest(out).extra["labels"] == ["neg", "pos"]
    assert main(["eval", "--model", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0 and result["examples"] == 12
    whole = evaluate_classifier(load_classifier(out), data)  # --data: every labelled example, not the split
    assert whole["examples"] == 60 and whole["data"] == str(data)
    assert main(["classify", "--model", str(out), "--text", "99 hello world", "--text", "99 def return x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split("\t")[0] for l in lines] == ["pos", "neg"]
    # A classifier predicts labels, not text: generate and eval --reference say so and point to classify.
    assert main(["generate", "--model", str(out), "--prompt", "x"]) == 2
    assert "is a classifier" in capsys.readouterr().err
    assert main(["eval", "--model", str(parent), "--reference", str(out)]) == 2
    assert "is a classifier" in capsys.readouterr().err


def test_lm_task_reports_domain_perplexity_before_and_after(tmp_path, parent, corpus_dir):
    out = tmp_path / "domain"
    finetune(_quick(model=str(parent), task="lm", data=str(corpus_dir), out=str(out), lr=3e-3, max_length=64,
                    lora_rank=4), log=lambda m: None)
    metrics = read_manifest(out).metrics
    assert metrics["domain_val_ppl"] < metrics["before_domain_val_ppl"]
    assert read_manifest(out).extra["lora"]["rank"] == 4
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        loaded = load_model(out)
        n = loaded.tokenizer.vocab_size  # ours masks the padding rows past the tokenizer; transformers does not
        torch.testing.assert_close(hf(ids).logits[..., :n], loaded.model(ids).logits[..., :n], atol=1e-5, rtol=1e-4)


def test_cli_errors_are_one_line(tmp_path, parent, capsys):
    data = tmp_path / "one.tsv"
    data.write_text("text\tlabel\nhello\tham\nworld\tham\n")
    code = main(["finetune", "--model", str(parent), "--task", "classify", "--data", str(data),
                 "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "at least two classes" in capsys.readouterr().err


def test_a_run_resumes_from_its_checkpoint_and_refuses_to_clobber_it(tmp_path, parent):
    data = _labelled_file(tmp_path)
    settings = dict(model=str(parent), task="classify", data=str(data), out=str(tmp_path / "clf"), lora_rank=2)
    finetune(_quick(**settings, max_steps=6), log=lambda m: None)
    with pytest.raises(ConfigError, match="--resume"):
        finetune(_quick(**settings, max_steps=8), log=lambda m: None)
    out = finetune(_quick(**settings, max_steps=8, resume=True), log=lambda m: None)
    assert out == tmp_path / "clf" and read_manifest(out).metrics["steps"] == 8
    assert load_classifier(tmp_path / "clf").labels == ["neg", "pos"]


# ---------------------------------------------------------------------------------------
# The stage's settings and boundaries


def test_config_fills_the_learning_rates_by_method_and_carries_help(tmp_path):
    from compactgpt.config import field_help

    full = FinetuneConfig(model="m", data="d", out="o")
    assert (full.lr, full.min_lr) == (3e-4, pytest.approx(3e-5))
    lora = FinetuneConfig(model="m", data="d", out="o", lora_rank=4)
    assert (lora.lr, lora.min_lr) == (2e-3, pytest.approx(2e-4))
    assert "2e-3 with LoRA" in field_help(FinetuneConfig, "lr")
    with pytest.raises(ConfigError, match="unknown task"):
        FinetuneConfig(model="m", data="d", out="o", task="translate")
    with pytest.raises(ConfigError, match="--lora-rank"):
        FinetuneConfig(model="m", data="d", out="o", lora_rank=-1)


def test_settings_rebuild_the_config_and_pass_unknown_keys_over():
    from compactgpt.finetune import config_from_settings

    config = FinetuneConfig(model="m", data="d", out="o", task="classify", lora_rank=2)
    assert config_from_settings({**config.to_dict(), "retired_setting": 1}) == config


def test_out_equal_to_the_parent_is_refused(parent):
    with pytest.raises(ConfigError, match="--out must differ from --model"):
        finetune(_quick(model=str(parent), task="lm", data=str(parent), out=str(parent)), log=lambda m: None)


def test_lm_refuses_a_data_folder_with_another_tokenizer(tmp_path, parent, data_dir):
    with pytest.raises(ConfigError, match="another tokenizer"):
        finetune(_quick(model=str(parent), task="lm", data=str(data_dir), out=str(tmp_path / "x")),
                 log=lambda m: None)


def test_the_stage_loads_no_application_code():
    import subprocess
    import sys

    code = ("import sys, compactgpt.finetune; "
            "bad = [m for m in sys.modules if m.startswith(('compactgpt.app', 'compactgpt.cli', 'compactgpt.bench', "
            "'compactgpt.pipeline', 'distill', 'quantize', 'export', 'onnx', 'matplotlib', 'transformers'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_split_is_rebuilt_from_settings_that_record_only_the_data(tmp_path):
    from compactgpt.finetune import classify_split, config_from_settings

    data = _labelled_file(tmp_path)
    _, val, labels = classify_split(config_from_settings({"task": "classify", "data": str(data), "val_fraction": 0.2}))
    assert len(val) == 12 and labels == ["neg", "pos"]
