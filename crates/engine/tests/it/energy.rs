//! Energy per request on the default model: every step's energy reaches the requests in it.

use std::time::Instant;

use souverain_engine::{
    Energy, EnergyConfig, EnergyKind, EnergySourceChoice, Engine, EngineConfig, Event,
    GenerateRequest,
};
use tokio::sync::mpsc::UnboundedReceiver;

/// Reads a generation to its end and returns its energy.
fn energy_of(mut rx: UnboundedReceiver<Event>) -> Energy {
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Done { usage, .. } => return usage.energy.expect("metered"),
            Event::Failed(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    }
    panic!("the engine dropped the request")
}

#[test]
fn requests_energy_sums_to_the_engine_total_and_is_labelled_modelled() {
    let Some(path) = testkit::default_model() else {
        return;
    };
    let (idle_watts, active_watts_per_thread, threads) = (10.0, 5.0, 2);
    let started = Instant::now();
    let e = Engine::load(
        &path,
        EngineConfig {
            threads,
            max_seqs: 8,
            // Small steps: prompts are chunked and decode tokens share steps with them.
            max_batch_tokens: 16,
            energy: EnergyConfig {
                source: EnergySourceChoice::Model,
                idle_watts,
                active_watts_per_thread,
            },
            ..EngineConfig::default()
        },
        &mut |_, _| {},
    )
    .expect("load");
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village far away from the sea, there lived",
        "def fibonacci(n):\n",
        "List three colours:",
    ];
    let mut energies = Vec::new();
    // Two bursts: the engine idles between them (and before the first).
    for burst in 0..2 {
        let receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = GenerateRequest::new(e.tokenize(p));
                r.sampling.temperature = 0.0;
                r.max_tokens = Some(4 + 3 * i + burst);
                e.generate(r).expect("submit")
            })
            .collect();
        energies.extend(receivers.into_iter().map(energy_of));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let m = e.metrics();
    assert_eq!(
        (m.energy.meter, m.energy.kind),
        ("model", EnergyKind::Modelled)
    );
    // A model never reports `measured`.
    assert!(energies.iter().all(|e| e.kind == EnergyKind::Modelled));
    assert!(energies.iter().all(|e| e.microjoules > 0), "{energies:?}");
    // Every step's microjoules went to its sequences, all of which finished: exact.
    let requests: u64 = energies.iter().map(|e| e.microjoules).sum();
    assert_eq!(requests, m.energy.requests_uj);
    assert!(m.energy.idle_uj > 0);
    // The model's total cannot exceed its full power over the wall time.
    let ceiling = (idle_watts + active_watts_per_thread * threads as f64) * elapsed * 1e6;
    let total = (m.energy.requests_uj + m.energy.idle_uj) as f64;
    assert!(total <= ceiling, "{total} µJ over {elapsed} s");
}
