// A small Markdown renderer for model output that builds DOM nodes only: text always enters
// the page as text nodes, so nothing in a model's answer can become markup or script.
//
// Blocks: paragraphs, ATX headings (#), fenced code (``` or ~~~), unordered (-, *, +) and
// ordered (1.) lists, block quotes (>), thematic breaks. Inline: code spans, **strong**,
// *emphasis* / _emphasis_, and [links](url) whose target is http or https; any other link
// stays text.

import { el } from "./dom.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^ {0,3}[-*+]\s+(.*)$/;
const ORDERED = /^ {0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;

/** `text` rendered as a `DocumentFragment`. */
export function render(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.append(el("p", {}, inline(paragraph.join("\n"))));
    paragraph = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      flush();
      const fence = m[1];
      const code = [];
      i += 1;
      while (i < lines.length && !lines[i].trimStart().startsWith(fence)) {
        code.push(lines[i]);
        i += 1;
      }
      i += 1; // The closing fence (or the end of an unfinished stream).
      const attrs = m[2] ? { "data-language": m[2] } : {};
      out.append(el("pre", {}, el("code", attrs, code.join("\n"))));
      continue;
    }
    if (line.trim() === "") {
      flush();
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      flush();
      out.append(el("hr"));
      i += 1;
      continue;
    }
    if ((m = HEADING.exec(line))) {
      flush();
      out.append(el(`h${Math.min(m[1].length + 2, 6)}`, {}, inline(m[2])));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        quoted.push(m[1]);
        i += 1;
      }
      out.append(el("blockquote", {}, render(quoted.join("\n"))));
      continue;
    }
    if (BULLET.test(line) || ORDERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const pattern = ordered ? ORDERED : BULLET;
      const first = ordered ? ORDERED.exec(line)[1] : null;
      const list = el(ordered ? "ol" : "ul", first && first !== "1" ? { start: first } : {});
      while (i < lines.length && (m = pattern.exec(lines[i]))) {
        const item = [ordered ? m[2] : m[1]];
        i += 1;
        // Indented lines continue the item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !pattern.test(lines[i])) {
          item.push(lines[i].trim());
          i += 1;
        }
        list.append(el("li", {}, inline(item.join("\n"))));
      }
      out.append(list);
      continue;
    }
    paragraph.push(line);
    i += 1;
  }
  flush();
  return out;
}

// The inline constructs, tried at each position in this order.
const INLINE = [
  { re: /^(`+)([\s\S]*?[^`])\1(?!`)/, make: (m) => el("code", {}, m[2].replace(/^ (.+) $/, "$1")) },
  { re: /^\[([^\]\n]+)\]\(\s*([^\s)]+)\s*\)/, make: (m) => link(m[1], m[2]) },
  // Underscores never close inside a word (`snake_case`, `window.__name`), as CommonMark says.
  { re: /^(?:\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_]))/u, make: (m) => el("strong", {}, inline(m[1] ?? m[2])) },
  { re: /^(?:\*(?=\S)([\s\S]*?[^\s*])\*(?!\*)|_(?=\S)([\s\S]*?[^\s_])_(?![\p{L}\p{N}_]))/u, make: (m) => el("em", {}, inline(m[1] ?? m[2])) },
];

/** A link if `target` is http(s), else the source text as it was written. */
function link(label, target) {
  let url;
  try {
    url = new URL(target);
  } catch (_) {
    return document.createTextNode(`[${label}](${target})`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    return document.createTextNode(`[${label}](${target})`);
  }
  return el("a", { href: url.href, rel: "noopener noreferrer", target: "_blank" }, inline(label));
}

/** Inline Markdown as an array of nodes; line breaks inside a paragraph become `<br>`. */
export function inline(text) {
  const nodes = [];
  let plain = "";
  const pushPlain = () => {
    const parts = plain.split("\n");
    parts.forEach((part, k) => {
      if (k > 0) nodes.push(el("br"));
      if (part) nodes.push(document.createTextNode(part));
    });
    plain = "";
  };
  let rest = text;
  while (rest.length) {
    const c = rest[0];
    if (c === "\\" && rest.length > 1 && /[\\`*_[\]()#+\-.!>~]/.test(rest[1])) {
      plain += rest[1];
      rest = rest.slice(2);
      continue;
    }
    let matched = null;
    // An underscore inside a word opens nothing.
    const intraword = c === "_" && /[\p{L}\p{N}]$/u.test(plain);
    if ("`[*_".includes(c) && !intraword) {
      for (const rule of INLINE) {
        const m = rule.re.exec(rest);
        if (m) {
          matched = { node: rule.make(m), length: m[0].length };
          break;
        }
      }
    }
    if (matched) {
      pushPlain();
      nodes.push(matched.node);
      rest = rest.slice(matched.length);
    } else {
      plain += c;
      rest = rest.slice(1);
    }
  }
  pushPlain();
  return nodes;
}
