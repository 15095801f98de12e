//! What `souverain plan` reads from an operator, as text: site files (TOML; a model file or
//! `config.json` they name is read from the disk), Hugging Face `config.json`s, CPU profiles
//! (each predicting a small load) and serve-load loads (JSON, predicted with a fixed
//! profile). GGUF model files have their own target (`gguf_parse`). Each must parse to a checked
//! value or an error naming its file, never panic; a site that parses must plan, and a
//! checked load must predict, in bounded time, with counts that add up (no wrapped totals).
//!
//! The first byte picks the reader; the rest is its text. Run with
//! `cargo +nightly fuzz run plan_inputs -- -timeout=20` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use souverain_plan::cpu::{CpuProfile, ServeLoad};
use souverain_plan::{model, search, site::Site};

/// A profile every load below is predicted with (the shape `souverain bench --profile`
/// writes).
const PROFILE: &str = include_str!("../../crates/plan/testdata/cpu-profile.json");

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(site) = Site::parse(text, "fuzz.toml", None) {
                let plan = search::plan(&site);
                // The library's counts saturate; so does this sum.
                let by_model = plan
                    .models
                    .iter()
                    .map(|m| m.gpus)
                    .fold(0, u64::saturating_add);
                assert_eq!(plan.totals.gpus, by_model);
                for m in &plan.models {
                    assert!(m.replicas_with_headroom >= m.replicas);
                }
            }
        }
        1 => {
            if let Ok(shape) = model::from_hf_config("fuzz", text, "config.json") {
                assert!(shape.params_b > 0.0 && shape.active_params_b <= shape.params_b);
            }
        }
        2 => {
            // A profile that parses predicts a small load that it checks.
            if let Ok(profile) = CpuProfile::parse(text, "profile.json") {
                let load = ServeLoad {
                    streams: 4,
                    prompt_tokens: 46,
                    max_tokens: 16,
                    requests: Vec::new(),
                    other_cpu_per_token_s: 0.0,
                    other_cpu_per_request_s: 0.0,
                };
                let kv = profile.serve_defaults.kv_cache_tokens;
                if load.check("load.json", "load", kv).is_ok() {
                    let r = souverain_plan::cpu::predict_serve_load(&profile, &load);
                    assert!(r.finished <= load.streams);
                }
            }
        }
        _ => {
            let profile = CpuProfile::parse(PROFILE, "profile.json").expect("the test profile");
            if let Ok(load) = serde_json::from_str::<ServeLoad>(text)
                && load
                    .check("load.json", "load", profile.serve_defaults.kv_cache_tokens)
                    .is_ok()
            {
                let r = souverain_plan::cpu::predict_serve_load(&profile, &load);
                assert!(r.finished <= load.streams);
            }
        }
    }
});
