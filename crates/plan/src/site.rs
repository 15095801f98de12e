//! The site file (TOML): the power envelope over time, PUE, headroom, the GPU systems on
//! offer, and the demand per model. Parsed once into a [`Site`] whose every number has been
//! checked; an error names the file and the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::{GpuSystem, Precision, catalogue};
use crate::error::PlanError;
use crate::model::{self, ModelShape};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    site: RawSiteHeader,
    #[serde(default)]
    system: Vec<toml::Table>,
    #[serde(default)]
    demand: Vec<RawDemand>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSiteHeader {
    name: String,
    pue: f64,
    #[serde(default = "one")]
    headroom_replicas: u32,
    #[serde(default)]
    demand_growth_per_month: f64,
    envelope: Vec<RawEnvelope>,
}

fn one() -> u32 {
    1
}

/// Largest site file read.
pub const MAX_SITE_BYTES: u64 = 1 << 20;
/// Longest mean prompt, tokens.
pub const MAX_INPUT_MEAN: f64 = 1_000_000.0;
/// Longest mean output, tokens (a reasoning model's longest answers are of this order).
pub const MAX_OUTPUT_MEAN: f64 = 131_072.0;
/// Largest Hugging Face `config.json` read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most GPU systems, and most models' demands, in a site file.
pub const MAX_ENTRIES: usize = 64;
/// Longest name (the site's, a system's, a model's).
pub const MAX_NAME_CHARS: usize = 200;
/// Most spare replicas per model.
pub const MAX_HEADROOM_REPLICAS: u32 = 1000;
/// Most requests per second of one model's demand (far beyond any site; replica and GPU
/// counts, which saturate, stay far from `u64::MAX` below it on any catalogue system).
pub const MAX_REQUESTS_PER_S: f64 = 1e7;
/// Fewest requests per second of one model's demand (one request in 11 days; the
/// simulation's arrivals stay finite above it).
pub const MIN_REQUESTS_PER_S: f64 = 1e-6;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    month: u32,
    facility_mw: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDemand {
    model: Option<String>,
    model_file: Option<PathBuf>,
    hf_config: Option<PathBuf>,
    name: Option<String>,
    #[serde(default = "fp8")]
    precision: Precision,
    requests_per_s: f64,
    input_tokens: Lengths,
    output_tokens: Lengths,
    slo: Slo,
}

fn fp8() -> Precision {
    Precision::Fp8
}

/// A length distribution: lognormal with this mean and coefficient of variation.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lengths {
    /// Mean tokens.
    pub mean: f64,
    /// Standard deviation over the mean (0: every request has the mean).
    #[serde(default)]
    pub cv: f64,
}

/// Latency promises: percentiles of time to first token and inter-token latency.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Its percentile (50, 90 or 99).
    #[serde(default = "p99")]
    pub ttft_percentile: f64,
    /// Inter-token latency, ms.
    pub itl_ms: f64,
    /// Its percentile (50, 90 or 99).
    #[serde(default = "p99")]
    pub itl_percentile: f64,
}

fn p99() -> f64 {
    99.0
}

/// One point of the power envelope.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EnvelopePoint {
    /// Months from now.
    pub month: u32,
    /// Facility power available, MW.
    pub facility_mw: f64,
}

/// The demand for one model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Demand {
    /// The model's shape.
    pub model: ModelShape,
    /// Weight precision to serve it in.
    pub precision: Precision,
    /// Requests per second now.
    pub requests_per_s: f64,
    /// Prompt lengths.
    pub input_tokens: Lengths,
    /// Output lengths.
    pub output_tokens: Lengths,
    /// Latency promises.
    pub slo: Slo,
}

/// A checked site file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Site {
    /// Its name.
    pub name: String,
    /// Power usage effectiveness (facility power over IT power).
    pub pue: f64,
    /// Spare replicas per model (N+k).
    pub headroom_replicas: u32,
    /// Demand growth per month (0.05: 5% a month, compounded).
    pub demand_growth_per_month: f64,
    /// Facility power over time, by month, increasing months.
    pub envelope: Vec<EnvelopePoint>,
    /// GPU systems on offer.
    pub systems: Vec<GpuSystem>,
    /// Demand per model.
    pub demand: Vec<Demand>,
}

impl Site {
    /// Reads and checks a site file; relative model paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Site, PlanError> {
        let text = read_bounded(path, MAX_SITE_BYTES)?;
        Self::parse(&text, &path.display().to_string(), path.parent())
    }

    /// Parses and checks a site file's text; `file` names it in errors, `dir` resolves
    /// relative model paths.
    pub fn parse(text: &str, file: &str, dir: Option<&Path>) -> Result<Site, PlanError> {
        let raw: RawSite = toml::from_str(text).map_err(|e| PlanError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let bad = |field: String, msg: &str| PlanError::field(file, field, msg);
        let h = raw.site;
        let name_ok =
            |name: &str| !name.trim().is_empty() && name.chars().count() <= MAX_NAME_CHARS;
        if !name_ok(&h.name) {
            return Err(bad(
                "site.name".into(),
                &format!("must be 1 to {MAX_NAME_CHARS} characters"),
            ));
        }
        if h.headroom_replicas > MAX_HEADROOM_REPLICAS {
            return Err(bad(
                "site.headroom_replicas".into(),
                &format!("must be at most {MAX_HEADROOM_REPLICAS}"),
            ));
        }
        for (field, n) in [("system", raw.system.len()), ("demand", raw.demand.len())] {
            if n > MAX_ENTRIES {
                return Err(bad(
                    field.into(),
                    &format!("at most {MAX_ENTRIES} entries, not {n}"),
                ));
            }
        }
        if !(h.pue.is_finite() && (1.0..=3.0).contains(&h.pue)) {
            return Err(bad("site.pue".into(), "must be between 1.0 and 3.0"));
        }
        if !(h.demand_growth_per_month.is_finite()
            && (0.0..=1.0).contains(&h.demand_growth_per_month))
        {
            return Err(bad(
                "site.demand_growth_per_month".into(),
                "must be between 0 and 1",
            ));
        }
        if h.envelope.is_empty() {
            return Err(bad("site.envelope".into(), "needs at least one point"));
        }
        let mut envelope = Vec::new();
        for (i, p) in h.envelope.iter().enumerate() {
            if !(p.facility_mw.is_finite() && p.facility_mw > 0.0) {
                return Err(bad(
                    format!("site.envelope[{i}].facility_mw"),
                    "must be a positive number of MW",
                ));
            }
            if envelope
                .last()
                .is_some_and(|q: &EnvelopePoint| q.month >= p.month)
            {
                return Err(bad(
                    format!("site.envelope[{i}].month"),
                    "months must increase",
                ));
            }
            if p.month > 120 {
                return Err(bad(
                    format!("site.envelope[{i}].month"),
                    "at most 120 months",
                ));
            }
            envelope.push(EnvelopePoint {
                month: p.month,
                facility_mw: p.facility_mw,
            });
        }
        if raw.system.is_empty() {
            return Err(bad("system".into(), "offer at least one GPU system"));
        }
        let known = catalogue();
        let mut systems = Vec::new();
        for (i, table) in raw.system.into_iter().enumerate() {
            let field = format!("system[{i}]");
            let name = table
                .get("name")
                .and_then(toml::Value::as_str)
                .ok_or_else(|| bad(format!("{field}.name"), "missing"))?
                .to_owned();
            if !name_ok(&name) {
                return Err(bad(
                    format!("{field}.name"),
                    &format!("must be 1 to {MAX_NAME_CHARS} characters"),
                ));
            }
            // A known system's specifications, with the file's fields over them.
            let mut merged = match known.iter().find(|s| s.name.eq_ignore_ascii_case(&name)) {
                Some(s) => match toml::Value::try_from(s) {
                    Ok(toml::Value::Table(t)) => t,
                    _ => toml::Table::new(),
                },
                None => toml::Table::new(),
            };
            merged.extend(table);
            let system: GpuSystem =
                toml::Value::Table(merged)
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        let hint = if known.iter().any(|s| s.name.eq_ignore_ascii_case(&name)) {
                            String::new()
                        } else {
                            format!(
                                " (`{name}` is not in the catalogue: {}; give every field)",
                                known
                                    .iter()
                                    .map(|s| s.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        };
                        bad(field.clone(), &format!("{}{hint}", e.message()))
                    })?;
            system.validate(file, &field)?;
            systems.push(system);
        }
        if raw.demand.is_empty() {
            return Err(bad("demand".into(), "name at least one model's demand"));
        }
        let mut demand = Vec::new();
        for (i, d) in raw.demand.into_iter().enumerate() {
            let field = |f: &str| format!("demand[{i}].{f}");
            if let Some(name) = &d.name
                && !name_ok(name)
            {
                return Err(bad(
                    field("name"),
                    &format!("must be 1 to {MAX_NAME_CHARS} characters"),
                ));
            }
            let model = match (&d.model, &d.model_file, &d.hf_config) {
                (Some(name), None, None) => model::preset(name).ok_or_else(|| {
                    bad(
                        field("model"),
                        &format!(
                            "no preset `{name}`; presets: {}; or give model_file (GGUF) or hf_config (config.json)",
                            model::preset_names().join(", ")
                        ),
                    )
                })?,
                (None, Some(p), None) => {
                    let path = resolve(dir, p);
                    let name = d.name.clone().unwrap_or_else(|| p.display().to_string());
                    model::from_gguf(&name, &path)?
                }
                (None, None, Some(p)) => {
                    let path = resolve(dir, p);
                    let text = read_bounded(&path, MAX_CONFIG_BYTES)?;
                    let name = d.name.clone().unwrap_or_else(|| p.display().to_string());
                    model::from_hf_config(&name, &text, &path.display().to_string())?
                }
                _ => {
                    return Err(bad(
                        field("model"),
                        "give exactly one of model (a preset), model_file (GGUF), hf_config (config.json)",
                    ));
                }
            };
            if !(MIN_REQUESTS_PER_S..=MAX_REQUESTS_PER_S).contains(&d.requests_per_s) {
                return Err(bad(
                    field("requests_per_s"),
                    &format!("must be between {MIN_REQUESTS_PER_S:e} and {MAX_REQUESTS_PER_S:e}"),
                ));
            }
            for (name, l, most) in [
                ("input_tokens", d.input_tokens, MAX_INPUT_MEAN),
                ("output_tokens", d.output_tokens, MAX_OUTPUT_MEAN),
            ] {
                if !(l.mean.is_finite() && l.mean >= 1.0 && l.mean <= most) {
                    return Err(bad(
                        field(&format!("{name}.mean")),
                        &format!("must be between 1 and {most}"),
                    ));
                }
                if !(l.cv.is_finite() && (0.0..=10.0).contains(&l.cv)) {
                    return Err(bad(
                        field(&format!("{name}.cv")),
                        "must be between 0 and 10",
                    ));
                }
            }
            let s = d.slo;
            for (name, v) in [("slo.ttft_ms", s.ttft_ms), ("slo.itl_ms", s.itl_ms)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(field(name), "must be a positive number of ms"));
                }
            }
            for (name, v) in [
                ("slo.ttft_percentile", s.ttft_percentile),
                ("slo.itl_percentile", s.itl_percentile),
            ] {
                if ![50.0, 90.0, 99.0].contains(&v) {
                    return Err(bad(field(name), "must be 50, 90 or 99"));
                }
            }
            demand.push(Demand {
                model,
                precision: d.precision,
                requests_per_s: d.requests_per_s,
                input_tokens: d.input_tokens,
                output_tokens: d.output_tokens,
                slo: s,
            });
        }
        Ok(Site {
            name: h.name,
            pue: h.pue,
            headroom_replicas: h.headroom_replicas,
            demand_growth_per_month: h.demand_growth_per_month,
            envelope,
            systems,
            demand,
        })
    }

    /// Facility MW available at `month` (linear between points, flat after the last).
    pub fn envelope_mw(&self, month: u32) -> f64 {
        let mut prev: Option<&EnvelopePoint> = None;
        for p in &self.envelope {
            if p.month >= month {
                return match prev {
                    Some(q) if p.month > q.month => {
                        let f = f64::from(month - q.month) / f64::from(p.month - q.month);
                        q.facility_mw + f * (p.facility_mw - q.facility_mw)
                    }
                    _ => p.facility_mw,
                };
            }
            prev = Some(p);
        }
        prev.map_or(0.0, |p| p.facility_mw)
    }
}

/// Reads a regular text file of at most `most` bytes: a device, a FIFO or a huge file named
/// by mistake is refused (after at most `most + 1` bytes), not read to its end or waited on.
pub fn read_bounded(path: &Path, most: u64) -> Result<String, PlanError> {
    use std::io::Read;
    let io = |source| PlanError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(PlanError::Parse {
            file: path.display().to_string(),
            message: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    file.take(most + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > most {
        return Err(PlanError::Parse {
            file: path.display().to_string(),
            message: format!("more than {most} bytes; such a file is at most that"),
        });
    }
    String::from_utf8(bytes).map_err(|e| PlanError::Parse {
        file: path.display().to_string(),
        message: format!("not UTF-8 text ({e})"),
    })
}

fn resolve(dir: Option<&Path>, p: &Path) -> PathBuf {
    match dir {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[site]
name = "t"
pue = 1.2
envelope = [{ month = 0, facility_mw = 40 }, { month = 18, facility_mw = 100 }]
[[system]]
name = "H200"
price_per_gpu = 30000
[[demand]]
model = "ministral-3-14b"
requests_per_s = 10
input_tokens = { mean = 1000, cv = 1 }
output_tokens = { mean = 300 }
slo = { ttft_ms = 2000, itl_ms = 50 }
"#;

    #[test]
    fn a_good_file_parses_with_catalogue_specifications() {
        let s = Site::parse(GOOD, "t.toml", None).unwrap();
        assert_eq!(s.systems[0].memory_gb, 141.0);
        assert_eq!(s.systems[0].price_per_gpu, Some(30000.0));
        assert_eq!(s.envelope_mw(9), 70.0);
        assert_eq!(s.envelope_mw(30), 100.0);
    }

    fn err(text: &str) -> String {
        Site::parse(text, "t.toml", None).unwrap_err().to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(err(&GOOD.replace("pue = 1.2", "pue = 0.5")).contains("site.pue"));
        assert!(
            err(&GOOD.replace("ttft_ms = 2000", "ttft_ms = -1")).contains("demand[0].slo.ttft_ms")
        );
        assert!(err(&GOOD.replace("\"ministral-3-14b\"", "\"gpt-9\"")).contains("demand[0].model"));
        assert!(
            err(&GOOD.replace("requests_per_s = 10", "requests_per_s = \"many\""))
                .contains("requests_per_s")
        );
        assert!(err(&GOOD.replace("name = \"H200\"", "name = \"TPU\"")).contains("system[0]"));
        assert!(err(&GOOD.replace("month = 18", "month = 0")).contains("site.envelope[1].month"));
        assert!(err(&GOOD.replace("cv = 1 }", "cv = 1, sigma = 2 }")).contains("sigma"));
        assert!(
            err(&GOOD.replace("price_per_gpu = 30000", "memory_gb = 0"))
                .contains("system[0].memory_gb")
        );
    }

    #[test]
    fn sizes_and_counts_are_bounded_and_named() {
        for rate in ["1e8", "5e-324", "0"] {
            assert!(
                err(&GOOD.replace("requests_per_s = 10", &format!("requests_per_s = {rate}")))
                    .contains("demand[0].requests_per_s"),
                "{rate}"
            );
        }
        assert!(
            err(&GOOD.replace(
                "output_tokens = { mean = 300 }",
                "output_tokens = { mean = 131073 }"
            ))
            .contains("demand[0].output_tokens.mean")
        );
        assert!(
            err(&GOOD.replace("mean = 1000, cv = 1", "mean = 1000001, cv = 1"))
                .contains("demand[0].input_tokens.mean")
        );
        assert!(
            err(&GOOD.replace("pue = 1.2", "pue = 1.2\nheadroom_replicas = 4000000000"))
                .contains("site.headroom_replicas")
        );
        assert!(
            err(&GOOD.replace("name = \"t\"", &format!("name = \"{}\"", "x".repeat(201))))
                .contains("site.name")
        );
        assert!(err(&GOOD.replace("name = \"t\"", "name = \" \"")).contains("site.name"));
        let demand = GOOD.split_once("[[demand]]").expect("a demand").1;
        let many = format!(
            "{GOOD}{}",
            format!("[[demand]]{demand}").repeat(MAX_ENTRIES)
        );
        assert!(err(&many).contains("`demand`"), "{}", err(&many));
        let most = format!(
            "{GOOD}{}",
            format!("[[demand]]{demand}").repeat(MAX_ENTRIES - 1)
        );
        assert_eq!(
            Site::parse(&most, "t.toml", None).expect("64").demand.len(),
            64
        );
        // A file over the size bound is refused before it is parsed.
        let dir = std::env::temp_dir().join(format!("souverain-site-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let big = dir.join("big.toml");
        let padding = "# padding\n".repeat((MAX_SITE_BYTES as usize) / 10 + 1);
        std::fs::write(&big, format!("{GOOD}{padding}")).expect("write");
        let e = Site::load(&big).expect_err("too big").to_string();
        assert!(e.contains("more than"), "{e}");
        std::fs::write(&big, GOOD).expect("write");
        assert!(Site::load(&big).is_ok());
        // A config.json named by mistake as a device is not read without end.
        let endless = GOOD.replace("model = \"ministral-3-14b\"", "hf_config = \"/dev/zero\"");
        let e = err(&endless);
        assert!(e.contains("/dev/zero: not a regular file"), "{e}");
        // A file over the bound whose cut falls inside a character is still too big.
        let config = dir.join("config.json");
        std::fs::write(&config, "é".repeat(MAX_CONFIG_BYTES as usize / 2 + 1)).expect("write");
        let e = read_bounded(&config, MAX_CONFIG_BYTES)
            .expect_err("big")
            .to_string();
        assert!(e.contains("more than"), "{e}");
        std::fs::write(&config, b"{\xff}").expect("write");
        let e = read_bounded(&config, MAX_CONFIG_BYTES)
            .expect_err("bytes")
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
