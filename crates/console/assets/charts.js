// Bar charts drawn as SVG: one group of bars per day, one bar per series (organisation).

import { count, el, svg } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 240;
const PAD = { left: 56, right: 8, top: 10, bottom: 40 };
const SERIES_CLASSES = 6;

/** A round upper bound for the axis, and its ticks. */
function scale(max) {
  if (max <= 0) return { top: 1, ticks: [0, 1] };
  const magnitude = 10 ** Math.floor(Math.log10(max));
  const step = [1, 2, 2.5, 5, 10].map((s) => s * magnitude).find((s) => max / s <= 5);
  const top = Math.ceil(max / step) * step;
  const ticks = [];
  for (let t = 0; t <= top + step / 2; t += step) ticks.push(t);
  return { top, ticks };
}

/**
 * A figure with a titled bar chart.
 * `days`: the x labels in order; `series`: [{name, values: Map(day → number)}].
 */
export function barChart(title, days, series) {
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const max = Math.max(0, ...series.flatMap((s) => days.map((d) => s.values.get(d) || 0)));
  const { top, ticks } = scale(max);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title}, per day and organisation`,
  });
  for (const t of ticks) {
    chart.append(
      svg("line", { class: "axis", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(t), y2: y(t) }),
      svg("text", { class: "tick", x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end" }, compact(t)),
    );
  }
  const groupW = plotW / Math.max(days.length, 1);
  const barW = Math.max(2, (groupW * 0.8) / Math.max(series.length, 1));
  const labelEvery = Math.ceil(days.length / 8);
  days.forEach((day, i) => {
    const x0 = PAD.left + i * groupW + groupW * 0.1;
    series.forEach((s, k) => {
      const v = s.values.get(day) || 0;
      const bar = svg("rect", {
        class: `series-${(k % SERIES_CLASSES) + 1}`,
        x: x0 + k * barW,
        y: y(v),
        width: Math.max(1, barW - 1),
        height: Math.max(0, PAD.top + plotH - y(v)),
      });
      bar.append(svg("title", {}, `${s.name}, ${day}: ${count(v)}`));
      chart.append(bar);
    });
    if (i % labelEvery === 0) {
      chart.append(svg("text", {
        class: "tick", x: PAD.left + i * groupW + groupW / 2, y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle",
      }, day.slice(5)));
    }
  });
  const legend = el("ul", { class: "legend" }, series.map((s, k) =>
    el("li", {}, el("span", { class: `swatch series-${(k % SERIES_CLASSES) + 1}`, "aria-hidden": "true" }), s.name)));
  return el("figure", { class: "chart" }, el("h2", {}, title), chart, legend);
}

/** 1234567 → 1.2M. */
function compact(n) {
  return new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 }).format(n);
}
