// Greedy generation with transformers.js in Node, from a local folder, printed as one JSON line:
//   node transformers_generate.mjs NODE_MODULES MODEL_FOLDER PROMPT MAX_NEW_TOKENS
// -> {"text": continuation by pipeline("text-generation"), "new_ids": ids by model.generate}
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [modules, folder, prompt, maxNew] = process.argv.slice(2);
const require = createRequire(`${modules}/`);
const { env, pipeline } = await import(pathToFileURL(require.resolve("@huggingface/transformers")).href);
env.allowRemoteModels = false;  // a local folder only: nothing is fetched
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder));

const generator = await pipeline("text-generation", path.basename(path.resolve(folder)), { device: "cpu" });
const options = { max_new_tokens: Number(maxNew), do_sample: false };
const [out] = await generator(prompt, { ...options, return_full_text: false });
const inputs = generator.tokenizer(prompt);
const ids = await generator.model.generate({ ...inputs, ...options });
const all = Array.from(ids.tolist()[0], Number);
let newIds = all.slice(inputs.input_ids.dims[1]);
const eos = generator.model.generation_config?.eos_token_id ?? generator.model.config.eos_token_id;
const stop = newIds.findIndex((t) => (Array.isArray(eos) ? eos.includes(t) : t === eos));
if (stop >= 0) newIds = newIds.slice(0, stop);  // generate keeps the end-of-text token; the reference does not
console.log(JSON.stringify({ text: out.generated_text, new_ids: newIds }));
