"""The web page's sampler (web/sampler.js) run by Node against compactgpt.sampling on fixed
logits: the repetition penalty bit for bit, and the greedy tokens of the loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compactgpt.sampling import penalize_repeats, stream_tokens
from node_helpers import run_module

SAMPLER_JS = Path(__file__).resolve().parents[2] / "compactgpt" / "app" / "deploy" / "web" / "sampler.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH: sampler.js cannot be run")

# Reads {cases: [{logits, seen, penalty}], loop: {prompt, steps, penalty}} and writes what
# sampler.js makes of them: the penalized logits and argmax of each case, and the greedy tokens of
# a loop fed one row of logits per step (as the page's generate() feeds the graph's).
RUNNER = """
import { readFileSync } from "node:fs";
import { argmax, penalizeRepeats, pickToken } from %s;
const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const cases = input.cases.map(({ logits, seen, penalty }) => {
  const out = penalizeRepeats(Float32Array.from(logits), new Set(seen), penalty);
  return { logits: Array.from(out), argmax: argmax(out),
           topK1: pickToken(out, { temperature: 1, topK: 1, topP: 1 }, Math.random) };
});
const seen = new Set(input.loop.prompt), tokens = [];
for (const row of input.loop.steps) {
  const token = pickToken(penalizeRepeats(Float32Array.from(row), seen, input.loop.penalty),
                          { temperature: 0, topK: 0, topP: 1 }, Math.random);
  seen.add(token);
  tokens.push(token);
}
process.stdout.write(JSON.stringify({ cases, tokens }));
"""


def test_sampler_js_penalizes_and_picks_as_python(tmp_path):
    g = torch.Generator().manual_seed(0)
    cases = []
    for penalty in (1.0, 1.1, 1.3, 2.0, 0.8):
        logits = torch.randn(1, 97, generator=g) * 6
        seen = torch.randint(0, 97, (20,), generator=g).unique()
        cases.append((logits, seen, penalty))
    # A loop where the greedy choice keeps wanting the same tokens: the penalty must walk it off them.
    steps = (torch.randn(1, 40, generator=g) + torch.linspace(0, 1, 40) * 0.2).repeat(12, 1)
    steps += torch.randn(12, 40, generator=g) * 0.05
    prompt = [3, 7, 3]
    got = run_module(tmp_path, RUNNER, SAMPLER_JS, {
        "cases": [{"logits": logits[0].tolist(), "seen": seen.tolist(), "penalty": p} for logits, seen, p in cases],
        "loop": {"prompt": prompt, "steps": steps.tolist(), "penalty": 1.4},
    })
    for (logits, seen, penalty), js in zip(cases, got["cases"]):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[0, seen] = True
        want = penalize_repeats(logits, mask, penalty)[0]
        assert torch.equal(torch.tensor(js["logits"], dtype=torch.float32), want), penalty
        assert js["argmax"] == js["topK1"] == int(want.argmax())
    calls = iter(steps)
    python = list(stream_tokens(lambda ids, pos, mask: next(calls)[None], torch.tensor([prompt]), len(steps), 64,
                                repetition_penalty=1.4))
    assert got["tokens"] == [int(t) for t in python]
    assert len(set(got["tokens"])) > 3  # the penalty moved the greedy choice around
