//! What the router reads from the wire: upstreams' Prometheus pages, request bodies (routing
//! keys) and router configuration files. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use souverain_fleet::EngineKind;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = souverain_fleet::scrape::parse_metrics(text);
    for kind in [EngineKind::Vllm, EngineKind::Sglang, EngineKind::LlamaCpp, EngineKind::Tgi] {
        let _ = souverain_fleet::scrape::load_from_metrics(kind, text);
    }
    let _ = souverain_fleet::RouterConfig::parse(text);
    if let Ok(body) = serde_json::from_str::<serde_json::Value>(text) {
        let config = souverain_fleet::RoutingConfig::default();
        let _ = souverain_fleet::routing_key(&body, &Default::default(), &config);
    }
});
