// DOM helpers. Text from the server only ever enters the page as text nodes or attribute
// values set one by one: nothing here parses HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      node.setAttribute("class", value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: `el("td", {class: "num"}, "12")`. Strings become text nodes. */
export function el(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, as `el`. */
export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Removes every child of `node`. */
export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

/** `document.getElementById`, failing loudly when the page lacks the element. */
export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`the page has no #${id}`);
  return node;
}

/** Shows `message` in a status line; `error` colours it. */
export function say(node, message, error = false) {
  node.textContent = message;
  node.classList.toggle("error", error);
}

/** A Unix-milliseconds time as local date and time. */
export function when(ms) {
  if (ms === null || ms === undefined) return "";
  return new Date(ms).toLocaleString();
}

/** A number with thousands separators. */
export function count(n) {
  return Number(n || 0).toLocaleString();
}
