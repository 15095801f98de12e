//! Energy per request on the default model: every step's energy reaches the requests in it;
//! engines and the embedding model on one account count the machine once.

use std::time::Instant;

use souverain_engine::{
    Embedder, EmbedderConfig, Energy, EnergyAccount, EnergyConfig, EnergyKind, EnergySourceChoice,
    Engine, EngineConfig, Event, GenerateRequest,
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

#[test]
fn engines_and_the_embedder_on_one_account_count_the_machine_once() {
    let (Some(path), Some(dir)) = (
        testkit::default_model(),
        testkit::embedding_model("model.safetensors"),
    ) else {
        return;
    };
    // The model at 10 W whether or not anything computes: the machine's energy over the run
    // is 10 W times its length, however many engines meter it.
    let idle_watts = 10.0;
    let config = EnergyConfig {
        source: EnergySourceChoice::Model,
        idle_watts,
        active_watts_per_thread: 0.0,
    };
    let started = Instant::now();
    let account = EnergyAccount::open(&config, 2).expect("the model is always there");
    let load = || {
        Engine::load(
            &path,
            EngineConfig {
                threads: 1,
                max_seqs: 4,
                energy: config.clone(),
                energy_account: Some(account.clone()),
                ..EngineConfig::default()
            },
            &mut |_, _| {},
        )
        .expect("load")
    };
    let (a, b) = (load(), load());
    let embedder = Embedder::load(
        &dir,
        EmbedderConfig {
            threads: 1,
            energy_account: Some(account.clone()),
            ..EmbedderConfig::default()
        },
    )
    .expect("load the embedding model");
    // Both engines generate while the embedder embeds: their steps overlap.
    let submit = |e: &Engine, prompt: &str| {
        let mut r = GenerateRequest::new(e.tokenize(prompt));
        r.sampling.temperature = 0.0;
        r.max_tokens = Some(24);
        e.generate(r).expect("submit")
    };
    let (ra, rb) = (
        submit(&a, "The capital of France is"),
        submit(&b, "Once upon a time"),
    );
    let texts: Vec<Vec<u32>> = ["a sentence to embed", "another one, a little longer"]
        .iter()
        .map(|t| embedder.tokenize(t))
        .collect();
    let mut embedded = 0u64;
    for _ in 0..5 {
        let (vectors, energy) = embedder.embed_metered(&texts).expect("embed");
        assert_eq!(vectors.len(), 2);
        assert_eq!(energy.kind, EnergyKind::Modelled);
        embedded += energy.microjoules;
    }
    let (ea, eb) = (energy_of(ra), energy_of(rb));
    let elapsed = started.elapsed().as_secs_f64();
    let (ma, mb, me) = (a.metrics().energy, b.metrics().energy, embedder.energy());
    // Each answer's energy is what its engine charged; the embedder's calls are its total.
    assert_eq!(
        (ea.microjoules, eb.microjoules),
        (ma.requests_uj, mb.requests_uj)
    );
    assert_eq!(embedded, me.requests_uj);
    assert!(ea.microjoules > 0 && eb.microjoules > 0 && embedded > 0);
    // One idle figure for the process, the same in every snapshot.
    assert_eq!(ma.idle_uj, mb.idle_uj);
    assert_eq!(ma.idle_uj, me.idle_uj);
    // Everything the meter gave, requests of every engine and idle, is at most the machine's
    // 10 W over the run (three meters of their own would each have counted it: about 3x).
    let total = (ma.requests_uj + mb.requests_uj + me.requests_uj + me.idle_uj) as f64;
    let ceiling = idle_watts * elapsed * 1e6;
    assert!(total <= ceiling, "{total} µJ in {elapsed} s");
    // And the meter was read up to near the end: at least the time since the last answer
    // began is in it (a loose floor: the engines' last readings came with their answers).
    assert!(
        total >= 0.5 * idle_watts * 1e6 * (elapsed - 1.0).max(0.0),
        "{total} µJ in {elapsed} s"
    );
}
