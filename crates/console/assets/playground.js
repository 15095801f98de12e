// The playground: a chat with the served model, streamed, with its settings.

import { byId, clear, el, say } from "./dom.js";
import { ApiFailure, openai, setApiKey } from "./http.js";
import { render } from "./markdown.js";
import { events } from "./sse.js";

const history = []; // {role, content, tool_calls?} as sent to the API.
let running = null; // The AbortController of the answer being streamed.

/** Fills the model list from `/v1/models` (chat models first, as the server lists them). */
export async function loadModels() {
  const select = byId("pg-model");
  const status = byId("pg-status");
  try {
    const response = await openai("/models");
    const body = await response.json();
    const previous = select.value;
    clear(select);
    for (const model of body.data || []) {
      select.append(el("option", { value: model.id }, model.id));
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    if (!select.options.length) say(status, "The server lists no model.", true);
    else if (status.classList.contains("error")) say(status, "");
  } catch (err) {
    if (err instanceof ApiFailure && err.status === 401) {
      say(status, "This server asks for an API key: enter one in the settings.", true);
    } else {
      say(status, `Could not list the models: ${err.message}`, true);
    }
  }
}

/** The request body from the settings and the conversation, or an error naming the field. */
function request() {
  const model = byId("pg-model").value;
  if (!model) throw new Error("Choose a model first.");
  const messages = [];
  const system = byId("pg-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = byId("pg-temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = byId("pg-max-tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const format = byId("pg-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try {
      schema = JSON.parse(byId("pg-schema").value);
    } catch (err) {
      throw new Error(`The JSON schema is not valid JSON: ${err.message}`);
    }
    body.response_format = {
      type: "json_schema",
      json_schema: { name: "console_schema", schema, strict: true },
    };
  }
  const tools = byId("pg-tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (err) {
      throw new Error(`The tools are not valid JSON: ${err.message}`);
    }
    body.tool_choice = byId("pg-tool-choice").value;
  }
  return body;
}

function messageItem(role) {
  const item = el("li", { class: `message ${role}` }, el("div", { class: "role" }, role));
  byId("transcript").append(item);
  return item;
}

/** One assistant answer being streamed into the transcript. */
class Answer {
  constructor() {
    this.item = messageItem("assistant");
    this.reasoning = "";
    this.content = "";
    this.toolCalls = [];
    this.reasoningBox = null;
    this.body = el("div", { class: "markdown" });
    this.calls = el("div", { class: "tool-calls" });
    this.stats = el("div", { class: "stats" });
    this.item.append(this.body, this.calls, this.stats);
    this.pending = false;
  }

  add(delta) {
    if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
      this.reasoning += delta.reasoning_content;
    }
    if (typeof delta.content === "string") this.content += delta.content;
    for (const call of delta.tool_calls || []) {
      const index = Number.isInteger(call.index) ? call.index : this.toolCalls.length;
      const slot = (this.toolCalls[index] ||= { id: "", type: "function", function: { name: "", arguments: "" } });
      if (call.id) slot.id = call.id;
      if (call.function && call.function.name) slot.function.name += call.function.name;
      if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
    }
    // Render at most once a frame, however fast the tokens come.
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  draw() {
    if (this.reasoning) {
      if (!this.reasoningBox) {
        this.reasoningText = el("div");
        this.reasoningBox = el("details", { class: "reasoning" }, el("summary", {}, "Reasoning"), this.reasoningText);
        this.item.insertBefore(this.reasoningBox, this.body);
      }
      this.reasoningText.textContent = this.reasoning;
    }
    clear(this.body);
    this.body.append(render(this.content));
    clear(this.calls);
    for (const call of this.toolCalls.filter(Boolean)) {
      let args = call.function.arguments;
      try {
        args = JSON.stringify(JSON.parse(args), null, 2);
      } catch (_) {
        // Arguments still streaming (or cut by max_tokens): shown as they are.
      }
      this.calls.append(
        el("div", { class: "tool-call" },
          el("strong", {}, "Tool call: "), el("code", {}, call.function.name),
          call.id ? el("span", { class: "muted" }, ` (${call.id})`) : null,
          el("pre", {}, args)),
      );
    }
  }

  finish({ ttftMs, seconds, usage, finish, chunks }) {
    this.draw();
    const parts = [];
    if (ttftMs !== null) parts.push(`TTFT ${Math.round(ttftMs)} ms`);
    const tokens = usage ? usage.completion_tokens : chunks;
    if (tokens && seconds > 0) parts.push(`${(tokens / seconds).toFixed(1)} tokens/s`);
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    const joules = usage && (usage.energy_joules ?? usage.energy_j);
    if (typeof joules === "number") parts.push(`${joules.toFixed(2)} J`);
    if (finish) parts.push(`finish: ${finish}`);
    this.stats.textContent = parts.join(" · ");
  }

  fail(message) {
    this.item.append(el("p", { class: "error" }, message));
  }

  message() {
    const m = { role: "assistant", content: this.content };
    const calls = this.toolCalls.filter(Boolean);
    if (calls.length) m.tool_calls = calls;
    return m;
  }
}

async function send(text) {
  const status = byId("pg-status");
  let body;
  history.push({ role: "user", content: text });
  try {
    body = request();
  } catch (err) {
    history.pop();
    say(status, err.message, true);
    return;
  }
  const user = messageItem("user");
  user.append(el("div", { class: "plain" }, text));
  const answer = new Answer();
  running = new AbortController();
  setBusy(true);
  say(status, "Generating…");
  const started = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  let chunks = 0;
  try {
    const response = await openai("/chat/completions", { method: "POST", body, signal: running.signal });
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta) {
          const d = choice.delta;
          if (first === null && (d.content || d.reasoning_content || d.tool_calls)) first = performance.now();
          if (d.content || d.reasoning_content || d.tool_calls) chunks += 1;
          answer.add(d);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const end = performance.now();
    answer.finish({
      ttftMs: first === null ? null : first - started,
      seconds: first === null ? 0 : (end - first) / 1000,
      usage,
      finish,
      chunks,
    });
    history.push(answer.message());
    say(status, "");
  } catch (err) {
    history.pop();
    if (err.name === "AbortError") {
      answer.finish({ ttftMs: first === null ? null : first - started, seconds: 0, usage, finish: "stopped", chunks });
      say(status, "Stopped.");
    } else {
      answer.fail(err.message);
      say(status, err.message, true);
    }
  } finally {
    running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  byId("pg-send").disabled = busy;
  byId("pg-stop").disabled = !busy;
}

/** Wires the playground's controls. */
export function setUp() {
  const input = byId("pg-input");
  const key = byId("pg-key");
  byId("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      byId("chat-form").requestSubmit();
    }
  });
  byId("pg-stop").addEventListener("click", () => running && running.abort());
  byId("pg-clear").addEventListener("click", () => {
    history.length = 0;
    clear(byId("transcript"));
    say(byId("pg-status"), "");
  });
  byId("pg-format").addEventListener("change", (event) => {
    byId("pg-schema-box").hidden = event.target.value !== "json_schema";
  });
  byId("chat-settings").addEventListener("submit", (event) => event.preventDefault());
  key.addEventListener("change", () => {
    setApiKey(key.value.trim());
    loadModels();
  });
}

/** Uses `secret` as the playground's API key (from a key just created). */
export function useKey(secret) {
  byId("pg-key").value = secret;
  setApiKey(secret);
  loadModels();
}
