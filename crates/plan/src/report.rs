//! The plan for people: one self-contained HTML page (tables and inline SVG plots drawn
//! here; no external asset or script).

use std::fmt::Write;

use crate::search::{self, Infeasible, Plan};

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line series: name, colour, points.
struct Series<'a> {
    name: &'a str,
    colour: &'a str,
    points: Vec<(f64, f64)>,
}

/// A line plot with linear axes from 0, as an SVG element.
fn plot(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, bottom, top, right) = (560.0, 300.0, 64.0, 40.0, 28.0, 16.0);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = xs.fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let y_max = ys
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let px = |x: f64| left + (x / x_max) * (w - left - right);
    let py = |y: f64| h - bottom - (y.min(y_max) / y_max) * (h - bottom - top);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        left,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{0}" stroke="#333"/>"##,
        h - bottom,
        w - right
    );
    for i in 0..=4 {
        let fx = x_max / 1.05 * f64::from(i) / 4.0;
        let fy = y_max / 1.1 * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            px(fx),
            h - bottom + 14.0,
            short(fx),
            left - 4.0,
            py(fy) + 4.0,
            short(fy),
            py(fy),
            w - right,
            py(fy)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        h - 6.0,
        esc(x_label),
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        esc(y_label)
    );
    for (k, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/><text x="{:.1}" y="{:.1}" fill="{}">{}</text>"#,
            se.colour,
            pts.join(" "),
            w - right - 150.0,
            top + 14.0 * (k as f64 + 1.0),
            se.colour,
            esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The HTML page.
pub fn html(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Souverain plan: {0}</title><style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 8px}}table{{border-collapse:collapse;display:block;max-width:100%;overflow-x:auto}}svg{{max-width:100%;height:auto}}p{{overflow-wrap:anywhere}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f3f3f3}}.bad{{color:#b00}}</style></head><body><h1>Site plan: {0}</h1>",
        esc(&plan.site)
    );
    let t = &plan.totals;
    let _ = write!(
        s,
        "<h2>Site totals</h2><table><tr><th>GPUs</th><th>racks</th><th>IT MW</th><th>facility MW</th><th>envelope MW now</th><th>tokens/s</th><th>tokens/s per MW</th></tr><tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{:.0}</td><td>{:.0}</td></tr></table><p>By system: {}</p>",
        t.gpus,
        t.racks,
        t.it_mw,
        t.facility_mw,
        t.envelope_mw,
        t.tokens_per_s,
        t.tokens_per_s_per_mw,
        esc(&t
            .gpus_by_system
            .iter()
            .map(|(n, g)| format!("{n}: {g}"))
            .collect::<Vec<_>>()
            .join(", "))
    );
    s.push_str("<h2>Per model</h2><table><tr><th>model</th><th>demand req/s</th><th>system</th><th>GPUs/replica</th><th>batch</th><th>weights+KV GB/GPU</th><th>tokens/s/replica</th><th>W/replica</th><th>J/token</th><th>replicas (N+k)</th><th>sim TTFT p50/p99 ms</th><th>sim ITL p50/p99 ms</th><th>binding</th></tr>");
    for m in &plan.models {
        match (&m.replica, &m.infeasible) {
            (Some(c), _) => {
                let sim = m.simulated.as_ref();
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}+{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.3}</td><td>{} ({})</td><td>{:.0}/{:.0}</td><td>{:.1}/{:.1}</td><td>{}</td></tr>",
                    esc(&m.model),
                    m.requests_per_s,
                    esc(&c.system),
                    c.gpus,
                    c.batch,
                    c.weights_gb_per_gpu,
                    c.kv_gb_per_gpu,
                    c.tokens_per_s,
                    c.replica_it_watts,
                    c.joules_per_token,
                    m.replicas,
                    m.replicas_with_headroom,
                    sim.map_or(0.0, |x| x.ttft_s[0] * 1e3),
                    sim.map_or(0.0, |x| x.ttft_s[2] * 1e3),
                    sim.map_or(0.0, |x| x.itl_s[0] * 1e3),
                    sim.map_or(0.0, |x| x.itl_s[2] * 1e3),
                    m.binding.map_or("", search::Binding::name)
                );
            }
            (None, Some(why)) => {
                let text = match why {
                    Infeasible::FitsNoGpu {
                        weights_gb,
                        largest_replica_gb,
                    } => format!(
                        "fits no GPU offered: {weights_gb:.0} GB of weights, largest replica {largest_replica_gb:.0} GB"
                    ),
                    Infeasible::SloUnmet {
                        best_itl_ms,
                        best_ttft_ms,
                    } => format!(
                        "no batch size meets the SLOs: best ITL {best_itl_ms:.1} ms, best TTFT {best_ttft_ms:.0} ms"
                    ),
                };
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{:.1}</td><td class=\"bad\" colspan=\"11\">{}</td></tr>",
                    esc(&m.model),
                    m.requests_per_s,
                    esc(&text)
                );
            }
            (None, None) => {}
        }
    }
    s.push_str("</table>");
    for m in plan.models.iter().filter(|m| m.replica.is_some()) {
        let _ = write!(s, "<h3>{}</h3>", esc(&m.model));
        let watts: Vec<(f64, f64)> = m
            .batch_curve
            .iter()
            .map(|c| (f64::from(c.batch), c.gpu_watts * f64::from(c.gpus)))
            .collect();
        let joules: Vec<(f64, f64)> = m
            .batch_curve
            .iter()
            .map(|c| (f64::from(c.batch), c.joules_per_token))
            .collect();
        s += &plot(
            "GPU power against batch size",
            "batch (sequences)",
            "W per replica",
            &[Series {
                name: "GPU W",
                colour: "#c0392b",
                points: watts,
            }],
        );
        s += &plot(
            "Energy per token against batch size",
            "batch (sequences)",
            "J/token",
            &[Series {
                name: "J/token",
                colour: "#2471a3",
                points: joules,
            }],
        );
        let ttft: Vec<(f64, f64)> = m
            .load_curve
            .iter()
            .map(|p| (p.requests_per_s, p.ttft_ms))
            .collect();
        let itl: Vec<(f64, f64)> = m
            .load_curve
            .iter()
            .map(|p| (p.requests_per_s, p.itl_ms))
            .collect();
        s += &plot(
            "Time to first token against load (simulated)",
            "requests/s per replica",
            "TTFT ms (SLO percentile)",
            &[Series {
                name: "TTFT",
                colour: "#7d3c98",
                points: ttft,
            }],
        );
        s += &plot(
            "Inter-token latency against load (simulated)",
            "requests/s per replica",
            "ITL ms (SLO percentile)",
            &[Series {
                name: "ITL",
                colour: "#17a589",
                points: itl,
            }],
        );
    }
    s.push_str("<h2>Growth</h2>");
    let need: Vec<(f64, f64)> = plan
        .growth
        .iter()
        .map(|g| (f64::from(g.month), g.facility_mw_needed))
        .collect();
    let env: Vec<(f64, f64)> = plan
        .growth
        .iter()
        .map(|g| (f64::from(g.month), g.envelope_mw))
        .collect();
    s += &plot(
        "Facility power: needed against envelope",
        "month",
        "MW",
        &[
            Series {
                name: "needed",
                colour: "#c0392b",
                points: need,
            },
            Series {
                name: "envelope",
                colour: "#333333",
                points: env,
            },
        ],
    );
    s.push_str("<table><tr><th>month</th><th>demand ×</th><th>GPUs needed</th><th>MW needed</th><th>MW envelope</th><th>GPUs installed</th><th>served</th><th>binding</th></tr>");
    for g in &plan.growth {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{:.2}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{:.0}%</td><td>{}</td></tr>",
            g.month,
            g.demand_factor,
            g.gpus_needed,
            g.facility_mw_needed,
            g.envelope_mw,
            g.gpus_installed,
            100.0 * g.served,
            g.binding.map_or("", search::Binding::name)
        );
    }
    let _ = writeln!(
        s,
        "</table><p>{} configurations scored. Efficiencies fitted on {}.</p></body></html>",
        plan.configurations,
        esc(&plan.fitted_on)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_scale_their_points_into_the_frame() {
        let svg = plot(
            "t<",
            "x",
            "y",
            &[Series {
                name: "s",
                colour: "#000",
                points: vec![(0.0, 0.0), (10.0, 5.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("t&lt;"));
        // The last point sits inside the plot area (x ≤ 544, y ≥ 28).
        let pts = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let last = pts.split(' ').next_back().unwrap();
        let (x, y) = last.split_once(',').unwrap();
        let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
        assert!(x <= 544.0 && y >= 28.0, "{x},{y}");
    }
}
