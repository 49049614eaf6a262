"""The web bundle's tokenizer.js must encode and decode exactly like Hugging Face `tokenizers`:
a page that tokenizes a prompt differently feeds the model ids it was never trained on. Each
test runs one Node process over many strings and compares with Python, token for token."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from compactgpt.tokenizer import EOT, Tokenizer, train_bpe
from node_helpers import run_module

TOKENIZER_JS = Path(__file__).resolve().parents[2] / "compactgpt" / "app" / "deploy" / "web" / "tokenizer.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH: tokenizer.js cannot be run")

RUNNER = """
import { readFileSync } from "node:fs";
import { BPETokenizer } from %s;
const results = [];
for (const spec of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  try {
    const tok = spec.viaUrl
      ? await BPETokenizer.fromUrl("data:application/json," + encodeURIComponent(JSON.stringify(spec.json)))
      : new BPETokenizer(spec.json);
    const encoded = spec.texts.map((t) => tok.encode(t));
    results.push({
      encoded,
      decoded: encoded.map((ids) => tok.decode(ids)),
      decodedIds: spec.decode.map((ids) => tok.decode(ids)),
      vocabSize: tok.vocabSize,
      tokenIds: spec.tokens.map((t) => tok.tokenId(t) ?? null),
    });
  } catch (e) {
    results.push({ error: String(e.message) });
  }
}
process.stdout.write(JSON.stringify(results));
"""

TRICKY = [
    "", " ", "  ", "  hello", "hello  ", "hello world", " hello world ", "a\n\n  b", "a \n b", "trailing spaces   ",
    "\r\n", "line1\r\nline2\r\n", "\ttab\tseparated\t\t", "tab\t\t  \t x", "multiple   spaces   between words",
    "ends with newline\n", "\n\n\nstarts after newlines", "\n" * 30, "    " * 50 + "x", " " * 1000,
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "combining e\u0301 a\u0308 n\u0303\u0323", "\u0301 leading combining",
    "CJK 中文字符测试 日本語のテキスト 한국어 텍스트", "numbers 12345 3.14159 1,000,000 ٣٤٥ ⅷ ²", "12345678901234567890",
    "it's they're we've I'm you'll he'd", "I'LL IT'S DON'T WE'VE", "don't 's 't 're", "x'sy 's '  'll", "''''",
    EOT, f"a{EOT}b", f"hello {EOT} world", f"{EOT}{EOT}", f" {EOT}\n", f"{EOT} starts", "<|endoftext", "<|endoftext|",
    "|endoftext|>", f"<|{EOT}|>", "<|endoftext|>" * 3 + "tail",
    "def f(self, x):\n    return self.value + x  # comment\n", "if (a && b) { return c[i]++; } else {}",
    "path/to/file.py:42", "!!!???...", "'''\"\"\"```", "mixed123abc_def-ghi", "snake_case CamelCase kebab-case",
    "\u00a0nbsp\u00a0 x", "\ufeffBOM first", "mid\ufeffBOM", "\u0085NEL\u0085 x \u0085", "\u3000ideographic\u3000space",
    "\u2028line\u2029para", "\x00\x01\x1f\x7f control", "a\u200bb zero\u200dwidth", "\x1c\x1d\x1e\x1f separators",
    "Ελληνικά Русский язык العربية עברית हिन्दी ไทย", "ẞ ß İ ı ǅ ﬁ", "z" * 500, "ab" * 300, "Ġ Ċ ĉ already mapped",
    "<mask> my <mask>name<mask>\t<mask> hello world <pad>  x", "xyz xyzw wxyz (xyz)", "abcd abcabcd abcdabc",
    "a!\u0085!b !\ufeff! x\u0085\u0085y", "'S 'LL 'Re 's's",
]

# Byte sequences that are not whole UTF-8 characters: decode must replace them as Rust's
# String::from_utf8_lossy does.
BAD_BYTES = [
    b"\xf0", b"\xf0\x9f", b"\xf0\x9f\x98", b"\xf0\x9f\x98a", b"a\xf0\x9f", b"\x80", b"\xff\xfe", b"\xc0\x80",
    b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xe2\x82\xac\xe2", b"\xef\xbb\xbfbom", b"\xc3",
]


def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, written independently of tokenizer.js."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " \t\n\r\u00a0\u3000\u2003", "'sStlLmdrve", ".,;:!?-_()[]{}<>/\\\"'`~@#$%^&*+=|",
        "éèàçüößñøåæœ", "абвгдежзийклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω", "中文字符日本語한국어",
        "😀😃🎉👍🏽❤️🇫🇷", "\u0301\u0308\u200d\u200b\ufe0f", "<|endoftext|>",
    ]
    texts = []
    for _ in range(n):
        picks = [rng.choice(pools) for _ in range(rng.randint(1, 4))]
        texts.append("".join(rng.choice(rng.choice(picks)) for _ in range(rng.randint(0, 40))))
    return texts


def multilingual_corpus() -> list[str]:
    """Made-up words from several scripts, repeated often enough for a 2000-token vocabulary."""
    rng = random.Random(1)
    syllables = [
        "ka ri to mu sen the ing ion er st ed an re on al ou".split(),
        "ко ра ни то ли ст ов ен ая ый".split(), "κα λη με το ρι ος ου".split(),
        "中 文 字 日 本 語 한 국 어".split(), "ال عر بي ة نص".split(), "हि न् दी पा ठ".split(),
        "dé ça über straß größ ño".split(), ["😀", "👍🏽", "🎉", "12", "345", "3.14", "!=", "->", "::", "'s", "'ll"],
    ]
    lexicon = []
    for _ in range(1500):
        inventory = rng.choice(syllables)
        word = "".join(rng.choice(inventory) for _ in range(rng.randint(1, 4)))
        lexicon.append(word.upper() if rng.random() < 0.1 else word)
    docs = []
    for _ in range(400):
        line = []
        for _ in range(rng.randint(10, 60)):
            line.append(rng.choice(lexicon))
            line.append(rng.choice([" ", " ", " ", "  ", "\n", ", ", ". ", "\t", "\n    "]))
        docs.append("".join(line))
    return docs


def run_node(tmp_path: Path, specs: list[dict]) -> list[dict]:
    return run_module(tmp_path, RUNNER, TOKENIZER_JS, specs)


def expectations(tok: HFTokenizer, texts: list[str], seed: int) -> tuple[dict, dict]:
    """The spec for Node, and what Python's `tokenizers` says it must produce."""
    vocab = tok.get_vocab(with_added_tokens=True)
    chars = byte_chars()
    decode = [[vocab[chars[b]] for b in bad] for bad in BAD_BYTES]
    rng = random.Random(seed)
    size = tok.get_vocab_size(with_added_tokens=True)
    decode += [[rng.randrange(size) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    decode.append([size + 7, vocab[chars[ord("a")]], 10**6])  # ids past the vocabulary are dropped
    tokens = [EOT, chars[ord(" ")] * 2, "hello", "not-a-token-at-all", "<mask>"]
    encoded = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    spec = {"json": json.loads(tok.to_str()), "texts": texts, "decode": decode, "tokens": tokens}
    want = {
        "encoded": encoded,
        "decoded": [tok.decode(ids, skip_special_tokens=False) for ids in encoded],
        "decodedIds": [tok.decode(ids, skip_special_tokens=False) for ids in decode],
        "vocabSize": size,
        "tokenIds": [tok.token_to_id(t) for t in tokens],
    }
    return spec, want


@pytest.fixture(scope="module")
def multilingual() -> Tokenizer:
    return train_bpe(multilingual_corpus(), vocab_size=2000)


def variant(tok: Tokenizer, name: str, tmp_path: Path) -> HFTokenizer:
    """The tokenizer CompactGPT writes, or a tokenizer.json edited to use one more feature."""
    if name == "vocab_merges_files":  # GPT-2's own files take the Tokenizer.from_folder path
        folder = tmp_path / "gpt2_style"
        folder.mkdir()
        tok._tok.model.save(str(folder))
        assert not (folder / "tokenizer.json").exists()
        return Tokenizer.from_folder(folder)._tok
    data = json.loads(tok.to_json())
    if name == "prefix_space":
        data["pre_tokenizer"]["add_prefix_space"] = True
    elif name == "no_regex":
        data["pre_tokenizer"]["use_regex"] = False
    elif name == "ignore_merges":
        # Whole words that merges alone would not produce, so ignore_merges changes ids.
        data["model"]["ignore_merges"] = True
        vocab = data["model"]["vocab"]
        for word in ["hello", "\u0120world", "separated", "\u0120spaces"]:
            vocab.setdefault(word, len(vocab))
    elif name == "legacy_merges":
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    elif name == "boundary_merges":
        # A merge for every adjacent byte pair of the tricky strings, ranked first: a pre-token
        # boundary in the wrong place then changes ids instead of going unnoticed.
        chars = byte_chars()
        vocab = data["model"]["vocab"]
        pairs = {}
        for text in TRICKY:
            mapped = [chars[b] for b in text.encode()]
            pairs.update(dict.fromkeys(zip(mapped, mapped[1:])))
        for a, b in pairs:
            vocab.setdefault(a + b, len(vocab))
        data["model"]["merges"] = [list(p) for p in pairs] + data["model"]["merges"]
    elif name == "sequence":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [data["pre_tokenizer"]]}
    hf = HFTokenizer.from_str(json.dumps(data))
    if name == "added_token_flags":
        hf.add_tokens([
            AddedToken("<mask>", single_word=True, lstrip=True, rstrip=True, normalized=False),
            AddedToken("hello world", normalized=True),
            AddedToken("xyz", single_word=True, normalized=False),
            AddedToken(byte_chars()[ord(" ")] * 2, normalized=False),
            AddedToken("abc", normalized=False),
            AddedToken("abcd", normalized=False),  # longer than "abc": the leftmost-longest match wins
        ])
        hf.add_special_tokens([AddedToken("<pad>", special=True, rstrip=True, normalized=False)])
    return hf


VARIANTS = ["as_written", "vocab_merges_files", "boundary_merges", "prefix_space", "no_regex", "ignore_merges",
            "legacy_merges", "sequence", "added_token_flags"]


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_python_tokenizers(name, tokenizer, multilingual, tmp_path):
    cases = []
    for i, tok in enumerate([tokenizer, multilingual]):
        (tmp_path / str(i)).mkdir()
        texts = TRICKY + random_texts(seed=i, n=60)
        spec, want = expectations(variant(tok, name, tmp_path / str(i)), texts, seed=i)
        spec["viaUrl"] = name == "as_written"  # fromUrl, fed a data: URL since Node cannot fetch files
        cases.append((texts, spec, want))
    results = run_node(tmp_path, [spec for _, spec, _ in cases])
    for (texts, spec, want), got in zip(cases, results):
        assert "error" not in got, got["error"]
        assert got["vocabSize"] == want["vocabSize"]
        assert got["tokenIds"] == want["tokenIds"], spec["tokens"]
        for text, g, w in zip(texts, got["encoded"], want["encoded"]):
            assert g == w, f"encode({text!r})"
        for text, g, w in zip(texts, got["decoded"], want["decoded"]):
            assert g == w, f"decode(encode({text!r}))"
        for ids, g, w in zip(spec["decode"], got["decodedIds"], want["decodedIds"]):
            assert g == w, f"decode({ids})"


def test_rejects_what_it_does_not_implement(byte_tokenizer, tmp_path):
    base = json.loads(byte_tokenizer.to_json())

    def edited(path: tuple[str, ...], value) -> dict:
        data = json.loads(json.dumps(base))
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    bad = {
        "normalizer": edited(("normalizer",), {"type": "NFC"}),
        "pre_tokenizer": edited(("pre_tokenizer",), {"type": "Whitespace"}),
        "pre_tokenizer Sequence": edited(("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, base["pre_tokenizer"]]}),
        "decoder": edited(("decoder",), None),
        "model type": edited(("model", "type"), "WordPiece"),
        "dropout": edited(("model", "dropout"), 0.1),
        "continuing_subword_prefix": edited(("model", "continuing_subword_prefix"), "##"),
        "truncation": edited(("truncation",), {"max_length": 8, "strategy": "LongestFirst", "stride": 0,
                                               "direction": "Right"}),
    }
    specs = [{"json": data, "texts": ["hi"], "decode": [], "tokens": []} for data in bad.values()]
    for (feature, _), got in zip(bad.items(), run_node(tmp_path, specs)):
        assert "error" in got, f"tokenizer.js accepted an unsupported {feature}"
        assert "not supported" in got["error"], got["error"]
        assert feature.split()[0] in got["error"], got["error"]
