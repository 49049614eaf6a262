// CompactGPT's web page: loads model/deploy.json (what the bundle holds), onnxruntime-web and the
// model's tokenizer, then generates with the KV cache, streaming tokens onto the page.
//
// The graph is the ONNX export's own: inputs input_ids, attention_mask, position_ids and
// past_key_values.{i}.key/value; outputs logits and present.{i}.key/value (names come from
// deploy.json, written from export.spec). Each step feeds the previous step's present as past.
//
// Scripts read the outcome from the page: #output (the continuation), document.title ("done" or
// "error: ..."), and window.compactgpt (token ids, prefill time, decode tokens/s, backend).

import { penalizeRepeats, mulberry32, pickToken } from "./sampler.js";
import { BPETokenizer } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = (window.compactgpt = { status: "loading" });

function fail(error) {
  const message = String(error && error.message ? error.message : error).split("\n")[0];
  state.status = "error";
  state.error = message;
  $("error").textContent = message;
  document.title = `error: ${message}`;
  console.error(error);
}

// -- loading -------------------------------------------------------------------------------

async function chooseBackend(info) {
  const asked = params.get("backend");
  if (asked === "wasm" || !info.ort_modules.webgpu) return "wasm";
  const adapter = "gpu" in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  // A fallback adapter is a software renderer: slower than the WASM backend, so taken only on request.
  const software = adapter && (adapter.info?.isFallbackAdapter ?? adapter.isFallbackAdapter);
  if (adapter && (!software || asked === "webgpu")) return "webgpu";
  if (asked === "webgpu") throw new Error("backend=webgpu was asked for but this browser has no WebGPU adapter");
  return "wasm";
}

async function load() {
  const response = await fetch("model/deploy.json");
  if (!response.ok) throw new Error(`model/deploy.json: HTTP ${response.status}; serve the bundle folder itself`);
  const info = await response.json();
  const backend = await chooseBackend(info);
  // Only the build the backend needs is downloaded (the WASM build's binary is half the size).
  const ort = await import(`./${info.ort_modules[backend]}`);
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  // WASM threads need SharedArrayBuffer, which browsers give only to cross-origin isolated pages
  // (served with COOP/COEP headers); elsewhere the page still runs, on one thread.
  const threads = self.crossOriginIsolated ? Number(params.get("threads") || info.threads) : 1;
  ort.env.wasm.numThreads = threads;
  // Steps run on the page's own thread, awaited between tokens: onnxruntime-web's proxy worker
  // (env.wasm.proxy) would keep the page responsive during a step but copies the KV cache
  // between threads every step (measured on the demo's int4 student: about half the tokens/s).
  const options = { executionProviders: [backend], graphOptimizationLevel: "all" };
  if (info.external_data) options.externalData = [{ path: info.external_data, data: `model/${info.external_data}` }];
  // Quantized weights come as DequantizeLinear of their codes: folded to float32 once, here, they
  // run on float kernels (WASM has no fast MatMulNBits kernel) and still download as int4/int8.
  if (info.fold_quantized_weights) options.extra = { session: { disable_quant_qdq: "1" } };
  if (backend === "webgpu") {
    // The KV cache stays on the GPU between steps; only the logits come back.
    options.preferredOutputLocation = Object.fromEntries(info.present_names.map((n) => [n, "gpu-buffer"]));
  }
  const started = performance.now();
  const session = await ort.InferenceSession.create(`model/${info.model_file}`, options);
  const tokenizer = await BPETokenizer.fromUrl("model/tokenizer.json");
  return { ort, info, session, tokenizer, backend, threads, loadMs: performance.now() - started };
}

// -- one token from the logits -----------------------------------------------------------------

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

// The last position's logits over the tokenizer's vocabulary (the graph may have padding rows).
function lastLogits(tensor, nTokens) {
  const [, T, V] = tensor.dims;
  const row = tensor.data.subarray((T - 1) * V, (T - 1) * V + nTokens);
  // float16 data comes as raw bits (Uint16Array) where the browser has no Float16Array.
  return row instanceof Uint16Array ? Float32Array.from(row, halfToFloat) : Float32Array.from(row);
}

// -- generation ------------------------------------------------------------------------------

function int64Tensor(ort, values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

// Yields new token ids one by one; stops after maxNew tokens, at <|endoftext|> (not yielded;
// unless options.noStop), or when shouldStop() turns true.
async function* generate(model, promptIds, options, shouldStop) {
  const { ort, info, session } = model;
  const emptyPast = () => new ort.Tensor(info.dtype, info.dtype === "float16" ? new Uint16Array(0) : new Float32Array(0),
                                         [1, info.n_head, 0, info.head_dim]);
  let past = Object.fromEntries(info.past_names.map((n) => [n, emptyPast()]));
  let ids = promptIds, cached = 0;
  const random = mulberry32(options.seed);
  const seen = new Set(promptIds);  // every token id in the text so far, for the repetition penalty
  for (let step = 0; step < options.maxNew && !shouldStop(); step++) {
    const T = ids.length;
    const feeds = {
      [info.input_ids]: int64Tensor(ort, ids, [1, T]),
      [info.attention_mask]: int64Tensor(ort, new Array(cached + T).fill(1), [1, cached + T]),
      [info.position_ids]: int64Tensor(ort, Array.from({ length: T }, (_, i) => cached + i), [1, T]),
      ...past,
    };
    const out = await session.run(feeds);
    const logits = penalizeRepeats(lastLogits(out[info.logits], info.n_tokens), seen, options.repetitionPenalty);
    const token = pickToken(logits, options, random);
    seen.add(token);
    for (const tensor of Object.values(past)) tensor.dispose?.();  // GPU buffers are freed by hand
    past = Object.fromEntries(info.past_names.map((n, i) => [n, out[info.present_names[i]]]));
    if (token === info.eot_id && !options.noStop) break;
    yield token;
    cached += T;
    ids = [token];
  }
  for (const tensor of Object.values(past)) tensor.dispose?.();
}

async function run(model, settings) {
  const { tokenizer, info } = model;
  const promptIds = settings.prompt ? tokenizer.encode(settings.prompt) : [info.eot_id];
  const room = info.n_positions - promptIds.length;
  if (room < 1) throw new Error(`the prompt has ${promptIds.length} tokens; the model reads at most ${info.n_positions}`);
  const maxNew = Math.min(settings.maxNew, room);
  Object.assign(state, { status: "generating", promptIds, newIds: [], output: "" });
  document.title = "generating";
  $("prompt-echo").textContent = settings.prompt;
  $("output").textContent = "";
  $("error").textContent = "";
  let stopped = false;
  $("stop").onclick = () => (stopped = true);
  $("stop").disabled = false;
  const started = performance.now();
  let firstAt = null, lastAt = null, shown = "";
  state.stepMs = [];  // time of each decode step (token after the first), for medians
  for await (const token of generate(model, promptIds, { ...settings, maxNew }, () => stopped)) {
    const now = performance.now();
    if (lastAt !== null) state.stepMs.push(now - lastAt);
    firstAt ??= now;
    lastAt = now;
    state.newIds.push(token);
    const text = tokenizer.decode(state.newIds);
    if (!text.endsWith("\ufffd")) {  // wait for the rest of a multi-byte character
      $("output").textContent = shown = text;
    }
    const decodeSeconds = (performance.now() - firstAt) / 1000;
    state.prefillMs = firstAt - started;
    state.decodeTokensPerSecond = state.newIds.length > 1 ? (state.newIds.length - 1) / decodeSeconds : null;
    showStats(model);
  }
  state.output = tokenizer.decode(state.newIds);
  $("output").textContent = state.output;
  $("stop").disabled = true;
  state.status = "done";
  document.title = "done";
}

function showStats(model) {
  const rate = state.decodeTokensPerSecond;
  $("stats").textContent = `${state.newIds.length} tokens · prefill ${state.prefillMs.toFixed(0)} ms` +
    (rate ? ` · ${rate.toFixed(1)} tokens/s` : "") +
    ` · ${model.backend}${model.backend === "wasm" ? `, ${model.threads} thread${model.threads > 1 ? "s" : ""}` : ""}`;
}

function settingsFrom(source) {
  const number = (name, fallback) => {
    const value = source(name);
    if (value === null || value === "") return fallback;
    const n = Number(value);
    if (!Number.isFinite(n) || n < 0) throw new Error(`${name}=${value} is not a non-negative number`);
    return n;
  };
  const maxNew = number("max_new_tokens", 64);
  if (!Number.isInteger(maxNew) || maxNew < 1) throw new Error(`max_new_tokens=${maxNew}: give a whole number, 1 or more`);
  const repetitionPenalty = number("repetition_penalty", 1);
  if (repetitionPenalty <= 0) {
    throw new Error(`repetition_penalty=${repetitionPenalty}: give a number above 0 (1 = off)`);
  }
  return {
    prompt: source("prompt") ?? "",
    maxNew,
    temperature: number("temperature", 0.8),
    topK: number("top_k", 50),
    topP: number("top_p", 0.95),
    repetitionPenalty,
    seed: number("seed", 0),
    noStop: params.get("no_stop") === "1",  // go on past <|endoftext|> (benchmarks), as generate --no-stop
  };
}

async function main() {
  const model = await load();
  const { info } = model;
  Object.assign(state, { status: "ready", backend: model.backend, threads: model.threads, loadMs: model.loadMs });
  $("model").textContent = `${info.description} · ${model.backend}` +
    (model.backend === "wasm" ? ` · ${model.threads} thread${model.threads > 1 ? "s" : ""}` : "") +
    ` · loaded in ${(model.loadMs / 1000).toFixed(1)} s`;
  for (const name of ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"]) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  $("prompt").value = params.has("prompt") ? params.get("prompt") : info.default_prompt;
  const fromForm = (name) => (name === "prompt" ? $("prompt").value : $(name).value);
  const start = async () => {
    $("generate").disabled = true;
    try {
      await run(model, settingsFrom(fromForm));
    } catch (error) {
      fail(error);
    } finally {
      $("generate").disabled = false;
    }
  };
  $("generate").onclick = start;
  $("generate").disabled = false;
  document.title = "ready";
  if (params.has("prompt")) await start();
}

main().catch(fail);
