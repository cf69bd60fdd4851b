// node tests/js/prompt.mjs TOKENIZER_DIR [CHAT_JSON] < cases.json  ->  the same JSON shape with JS results on stdout.
// CHAT_JSON: site.json's `chat` for a model with its own chat template (a version from an imported base).
// Runs web_static/prompt.js with the tokenizer the site uses (transformers.js's shipped bundle, local
// files only), for the Python-vs-JS prompt parity test (tests/test_prompt.py).
import { readFile } from "node:fs/promises";
import { basename, dirname } from "node:path";
import { env, AutoTokenizer } from "../../web_static/node_modules/@huggingface/transformers/dist/transformers.js";
import { buildPrompt, chatTokenizer, citedNumbers, clipText, defuseSpecialTokens, prepareContext, retrievalQuery } from "../../web_static/prompt.js";

const [dir, chat] = process.argv.slice(2);
env.allowRemoteModels = false;  // as in web_static/worker.js: never the Hub
env.allowLocalModels = true;
env.localModelPath = dirname(dir) + "/";
env.useBrowserCache = false;
env.fetch = async (url) => {  // the web bundle fetches local model files; node's fetch cannot read paths
  try { return new Response(await readFile(String(url))); } catch { return new Response(null, { status: 404 }); }
};
const tok = chatTokenizer(await AutoTokenizer.from_pretrained(basename(dir)), chat ? JSON.parse(chat) : null);

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const cases = input.cases.map((c) => {
  try {
    const passages = c.prepare_chars === null ? c.passages : prepareContext(c.passages, c.prepare_chars);
    const p = buildPrompt(tok, c.messages, passages, c.system_prompt, c.max_new_tokens, c.max_seq_len,
                          input.min_passage_chars);
    return { ids: p.ids, messages: p.messages, passages: p.passages, question: p.question,
             query: retrievalQuery(c.messages, c.system_prompt) };
  } catch (e) {
    return { error: String(e?.message || e) };
  }
});
process.stdout.write(JSON.stringify({
  cases,
  cited: input.cited.map(citedNumbers),
  defused: input.defused.map(defuseSpecialTokens),
  clipped: input.clipped.map(([text, n]) => clipText(text, n)),
}));
