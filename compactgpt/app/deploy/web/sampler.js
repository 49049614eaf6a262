// Picking one token from the last position's logits, as compactgpt.sampling does in Python:
// the repetition penalty first, then temperature, top-k and top-p, then one draw; temperature 0
// is greedy. No page or browser API here, so Node runs this file alone to compare it with Python.

// The first maximum, as torch.argmax.
export function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

// A small seeded generator: the same seed gives the same draws on every browser.
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// transformers' RepetitionPenaltyLogitsProcessor, in place on a Float32Array: each token id in
// `seen` (prompt and generated) has a positive logit divided by the penalty and a negative one
// multiplied by it. Math.fround rounds as float32 arithmetic does, so the result is bit for bit
// what PyTorch computes on float32 logits. A penalty of 1 changes nothing.
export function penalizeRepeats(logits, seen, penalty) {
  if (penalty === 1) return logits;
  const p = Math.fround(penalty);
  for (const id of seen) {
    if (id < logits.length) logits[id] = Math.fround(logits[id] > 0 ? logits[id] / p : logits[id] * p);
  }
  return logits;
}

// Temperature, then top-k, then nucleus (top-p) filtering, then one draw with `random` (a
// function returning [0, 1)). Temperature 0 is greedy.
export function pickToken(logits, { temperature, topK, topP }, random) {
  if (temperature === 0) return argmax(logits);
  let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  if (topK > 0) order = order.slice(0, topK);
  const top = logits[order[0]];
  let probs = order.map((i) => Math.exp((logits[i] - top) / temperature));
  let sum = probs.reduce((a, b) => a + b, 0);
  if (topP < 1) {
    let cum = 0, keep = 0;
    while (keep < probs.length && cum < topP) cum += probs[keep++] / sum;  // keeps the token crossing top-p
    order = order.slice(0, keep);
    probs = probs.slice(0, keep);
    sum = probs.reduce((a, b) => a + b, 0);
  }
  let r = random() * sum;
  for (let k = 0; k < order.length; k++) if ((r -= probs[k]) <= 0) return order[k];
  return order[order.length - 1];
}
