// tokenizer.js: a dependency-free byte-level BPE tokenizer for the tokenizer.json files
// CompactGPT writes, for the browser (and Node, where the tests run it). It reproduces
// Hugging Face `tokenizers` id for id: added-token splitting, the ByteLevel pre-tokenizer
// (GPT-2's regex), the BPE model and the ByteLevel decoder. A tokenizer.json feature it
// does not reproduce is refused when loading rather than encoded differently.

// GPT-2's byte <-> character table: printable Latin-1 bytes stand for themselves, the others
// are shifted to U+0100 upward in byte order, so every token is a visible string.
const BYTE_CHAR = [];
const CHAR_BYTE = new Map();
for (let b = 0, n = 0; b < 256; b++) {
  const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
  BYTE_CHAR[b] = String.fromCharCode(printable ? b : 256 + n++);
  CHAR_BYTE.set(BYTE_CHAR[b], b);
}

// tokenizers runs GPT-2's pattern through Oniguruma, whose \s is JavaScript's \s plus U+0085
// (NEL) and without U+FEFF (a BOM is punctuation there), so \s is spelled out. \p{L} and \p{N}
// follow the engine's Unicode version: characters Oniguruma's tables lack (as of tokenizers
// 0.22, those new in Unicode 17) may split differently.
const S = "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const SPLIT = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${S}\\p{L}\\p{N}]+|[${S}]+(?![^${S}])|[${S}]+`,
  "gu",
);
// Added-token flags are checked with Rust's `regex` crate, whose \w and \s are Unicode-wide.
const WORD_END = /[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]$/u;
const WORD_START = /^[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]/u;
const SPACE = /^\p{White_Space}$/u;

const ENC = new TextEncoder();
// ignoreBOM keeps a leading U+FEFF, as Rust's String::from_utf8_lossy does; invalid bytes
// become U+FFFD per maximal invalid subsequence in both.
const DEC = new TextDecoder("utf-8", { ignoreBOM: true });
const POS = 2 ** 32; // heap keys pack (rank, position) as rank * POS + position

function unsupported(what) {
  throw new Error(`tokenizer.json: ${what} is not supported by tokenizer.js, which handles byte-level BPE only`);
}

function malformed(what) {
  throw new Error(`tokenizer.json: ${what}`);
}

// A Sequence of a single ByteLevel step behaves like the step itself.
function byteLevel(part, name) {
  const inner = part?.type === "Sequence" ? part.pretokenizers ?? part.decoders : null;
  if (inner?.length === 1) part = inner[0];
  if (part?.type !== "ByteLevel") {
    unsupported(`${name} ${JSON.stringify(part?.type ?? part ?? null)} (only ByteLevel)`);
  }
  return part;
}

function heapPush(h, v) {
  let i = h.length;
  h.push(v);
  while (i > 0) {
    const p = (i - 1) >> 1;
    if (h[p] <= v) break;
    h[i] = h[p];
    i = p;
  }
  h[i] = v;
}

function heapPop(h) {
  const top = h[0], last = h.pop();
  if (h.length) {
    let i = 0;
    for (;;) {
      let c = 2 * i + 1;
      if (c >= h.length) break;
      if (c + 1 < h.length && h[c + 1] < h[c]) c++;
      if (h[c] >= last) break;
      h[i] = h[c];
      i = c;
    }
    h[i] = last;
  }
  return top;
}

export class BPETokenizer {
  constructor(json) {
    if (!json || typeof json !== "object") throw new Error("tokenizer.json must be a JSON object");
    if (json.normalizer != null) unsupported(`normalizer ${JSON.stringify(json.normalizer.type ?? json.normalizer)}`);
    if (json.truncation != null) unsupported("truncation");
    if (json.padding != null) unsupported("padding");
    const pre = byteLevel(json.pre_tokenizer, "pre_tokenizer");
    byteLevel(json.decoder, "decoder");
    // The post-processor only adds special tokens, which encode() never asks for.
    this.addPrefixSpace = pre.add_prefix_space ?? true;
    this.useRegex = pre.use_regex ?? true;

    const m = json.model;
    if (!m || (m.type ?? "BPE") !== "BPE" || !m.vocab || !m.merges) {
      unsupported(`model type ${JSON.stringify(m?.type ?? null)} (only BPE)`);
    }
    if (m.dropout) unsupported("BPE dropout");
    if (m.byte_fallback) unsupported("BPE byte_fallback");
    if (m.continuing_subword_prefix || m.end_of_word_suffix) {
      unsupported("continuing_subword_prefix / end_of_word_suffix");
    }
    this.ignoreMerges = !!m.ignore_merges;
    this.fuseUnk = !!m.fuse_unk;
    this.vocab = new Map(Object.entries(m.vocab));
    this.vocabR = new Map();
    let maxId = 0;
    for (const [tok, id] of this.vocab) {
      this.vocabR.set(id, tok);
      maxId = Math.max(maxId, id);
    }
    this.unkId = m.unk_token == null ? undefined : this.vocab.get(m.unk_token);
    if (m.unk_token != null && this.unkId === undefined) {
      malformed(`unk_token ${JSON.stringify(m.unk_token)} is not in the vocabulary`);
    }

    // pair key -> [rank, merged id]; a later duplicate pair overrides, as in tokenizers.
    this.stride = maxId + 1;
    this.merges = new Map();
    if (m.merges.length >= 2 ** 21) unsupported("more than 2^21 merges");
    m.merges.forEach((merge, rank) => {
      const pair = typeof merge === "string" ? merge.split(" ") : merge;
      if (!Array.isArray(pair) || pair.length !== 2) malformed(`merge ${JSON.stringify(merge)} is not a pair`);
      const [a, b] = pair, ia = this.vocab.get(a), ib = this.vocab.get(b), ab = this.vocab.get(a + b);
      if (ia === undefined || ib === undefined || ab === undefined) {
        malformed(`merge ${JSON.stringify(pair)} uses a token missing from the vocabulary`);
      }
      this.merges.set(ia * this.stride + ib, [rank, ab]);
    });

    // tokenizers ignores empty added tokens; the others are matched leftmost-longest, those
    // with normalized=false on the raw text first, the rest on what is left.
    const added = (json.added_tokens ?? []).filter((t) => t.content !== "");
    this.addedByContent = new Map(added.map((t) => [t.content, t]));
    this.addedById = new Map(added.map((t) => [t.id, t.content]));
    const alternation = (toks) => toks.length === 0 ? null : new RegExp(
      toks.map((t) => t.content).sort((x, y) => y.length - x.length)
        .map((c) => c.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"), "gu");
    this.rawAdded = alternation(added.filter((t) => !t.normalized));
    this.normAdded = alternation(added.filter((t) => t.normalized));
    this.size = new Set([...this.vocab.keys(), ...this.addedByContent.keys()]).size;
    this.cache = new Map();
  }

  static async fromUrl(url) {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`could not fetch ${url}: HTTP ${res.status}`);
    return new BPETokenizer(await res.json());
  }

  get vocabSize() {
    return this.size;
  }

  tokenId(token) {
    return this.addedByContent.get(token)?.id ?? this.vocab.get(token);
  }

  encode(text) {
    const ids = [];
    for (const part of this.#splitAdded(text, this.rawAdded)) {
      for (const piece of typeof part === "string" ? this.#splitAdded(part, this.normAdded) : [part]) {
        if (typeof piece !== "string") ids.push(piece.id);
        else for (const word of this.#words(piece)) for (const id of this.#word(word)) ids.push(id);
      }
    }
    return ids;
  }

  decode(ids) {
    const bytes = [];
    for (const id of ids) {
      const tok = this.addedById.get(id) ?? this.vocabR.get(id);
      if (tok === undefined) continue; // tokenizers drops ids it does not know
      const mapped = [];
      for (const ch of tok) mapped.push(CHAR_BYTE.get(ch));
      // A token with any character outside the byte table (an added token) stands for its own UTF-8.
      for (const b of mapped.includes(undefined) ? ENC.encode(tok) : mapped) bytes.push(b);
    }
    return DEC.decode(Uint8Array.from(bytes));
  }

  // Added tokens and the text between them, as tokenizers' AddedVocabulary::find_matches.
  #splitAdded(text, re) {
    if (!re || text === "") return text === "" ? [] : [text];
    const out = [];
    let offset = 0, m;
    re.lastIndex = 0;
    while ((m = re.exec(text))) {
      const tok = this.addedByContent.get(m[0]);
      let start = m.index, stop = start + m[0].length;
      if (tok.single_word) {
        // Two UTF-16 units on each side hold the neighbouring character even when it is astral.
        const before = text.slice(Math.max(0, start - 2), start), after = text.slice(stop, stop + 2);
        if (WORD_END.test(before) || WORD_START.test(after)) continue;
      }
      if (tok.lstrip) while (start > offset && SPACE.test(text[start - 1])) start--;
      if (tok.rstrip) while (stop < text.length && SPACE.test(text[stop])) stop++;
      if (offset < start) out.push(text.slice(offset, start));
      out.push({ id: tok.id });
      offset = stop;
    }
    if (offset < text.length) out.push(text.slice(offset));
    return out;
  }

  // The ByteLevel pre-tokenizer's words, still as text: each piece between added tokens gets
  // its own prefix space.
  #words(text) {
    if (this.addPrefixSpace && !text.startsWith(" ")) text = " " + text;
    return this.useRegex ? text.match(SPLIT) ?? [] : [text];
  }

  #word(word) {
    let ids = this.cache.get(word);
    if (ids) return ids;
    let chars = "";
    for (const b of ENC.encode(word)) chars += BYTE_CHAR[b];
    const whole = this.ignoreMerges ? this.vocab.get(chars) : undefined;
    ids = whole === undefined ? this.#bpe(chars) : [whole];
    if (this.cache.size >= 100000) this.cache.clear();
    this.cache.set(word, ids);
    return ids;
  }

  // tokenizers' Word::merge_all: always apply the lowest-ranked merge present, leftmost first,
  // with a heap of candidate pairs whose stale entries are skipped when popped.
  #bpe(chars) {
    const sym = [];
    let prevUnknown = false;
    for (const ch of chars) {
      const id = this.vocab.get(ch);
      // With no unk_token tokenizers silently drops a character missing from the vocabulary.
      if (id === undefined && this.unkId !== undefined && !(this.fuseUnk && prevUnknown)) sym.push(this.unkId);
      if (id !== undefined) sym.push(id);
      prevUnknown = id === undefined;
    }
    const n = sym.length;
    if (n < 2) return sym;
    const next = Int32Array.from(sym, (_, i) => (i + 1 < n ? i + 1 : -1));
    const prev = Int32Array.from(sym, (_, i) => i - 1);
    const dead = new Uint8Array(n);
    const heap = [];
    const consider = (i) => {
      const merge = next[i] >= 0 && this.merges.get(sym[i] * this.stride + sym[next[i]]);
      if (merge) heapPush(heap, merge[0] * POS + i);
    };
    for (let i = 0; i < n - 1; i++) consider(i);
    while (heap.length) {
      const top = heapPop(heap), i = top % POS, j = next[i];
      if (dead[i] || j < 0) continue;
      const merge = this.merges.get(sym[i] * this.stride + sym[j]);
      if (!merge || merge[0] !== (top - i) / POS) continue;
      sym[i] = merge[1];
      dead[j] = 1;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      if (prev[i] >= 0) consider(prev[i]);
      consider(i);
    }
    return sym.filter((_, i) => !dead[i]);
  }
}
