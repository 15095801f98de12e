//! The Q8_0 KV cache (`--kv-cache-type q8_0`) against the f16 one, on the default model:
//! 34/64 of the bytes, and the prompt's log-probabilities (every position of a ~700-token
//! text, its keys and values read back quantised) change its perplexity by about 1%.
//! Prints the figures (`--nocapture`).

use souverain_engine::{Engine, EngineConfig, Event, GenerateRequest, KvType, TokenLogprobs};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine(kv_cache_type: KvType) -> Option<Engine> {
    let path = testkit::default_model()?;
    let config = EngineConfig {
        threads: 2,
        kv_cache_type,
        ..EngineConfig::default()
    };
    Some(Engine::load(&path, config, &mut |_, _| {}).expect("load"))
}

fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<TokenLogprobs>, String) {
    let (mut prompt, mut text) = (Vec::new(), String::new());
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::PromptLogprobs(lp) => prompt = lp,
            Event::Text(t) => text.push_str(&t),
            Event::Logprobs(_) => {}
            Event::Done { .. } => return (prompt, text),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the engine dropped the request")
}

const TEXT: &str = "The old lighthouse stood at the edge of the cliff for more than two hundred \
years. Every night its keeper climbed the narrow stairs, trimmed the wick and polished the great \
lens, so that the ships passing through the strait could find their way between the rocks. In \
winter the storms came from the north, and the waves rose so high that spray reached the lantern \
room. The keeper kept a logbook in which he wrote the weather, the ships he saw and the hours he \
slept. His daughter learned to read from that logbook, sitting by the stove while the wind howled \
outside. When the lighthouse was finally automated, the keeper and his daughter moved to the \
village below, but every evening they still walked to the harbour to watch the beam sweep across \
the water. The villagers said that the light had never shone as brightly as in the years when the \
keeper cared for it, and the fishermen told their children stories about the man who never missed \
a single night. Today the logbook is kept in the village museum, open at the page where the \
keeper wrote about the great storm of the winter when the harbour wall was broken by the sea. \
Visitors come from far away to read it. Some of them stay in the small hotel by the harbour, \
where the owner serves fish soup and tells the story again, each time with a few new details: \
the colour of the sky that night, the name of the ship that was saved, the sound of the bell. \
Nobody knows which details are true, but everybody agrees that the story is worth hearing, and \
that the lighthouse, now white and silent on its cliff, still watches over the strait.";

#[test]
fn q8_0_cache_halves_the_bytes_and_keeps_the_perplexity() {
    let (Some(f16), Some(q8)) = (engine(KvType::F16), engine(KvType::Q8_0)) else {
        return;
    };
    let (bf, bq) = (
        f16.description().kv_cache_bytes,
        q8.description().kv_cache_bytes,
    );
    assert_eq!(bq * 64, bf * 34, "Q8_0 bytes {bq} vs f16 {bf}");
    let tokens = f16.tokenize(TEXT);
    assert!(tokens.len() > 300, "{} tokens", tokens.len());
    let run = |e: &Engine| {
        let mut r = GenerateRequest::new(tokens.clone());
        r.sampling.temperature = 0.0;
        r.max_tokens = Some(16);
        r.prompt_logprobs = Some(1);
        collect(e.generate(r).expect("submit"))
    };
    let ((lf, tf), (lq, tq)) = (run(&f16), run(&q8));
    assert_eq!(lf.len(), tokens.len() - 1);
    assert_eq!(lq.len(), lf.len());
    let nll = |lp: &[TokenLogprobs]| -lp.iter().map(|t| f64::from(t.logprob)).sum::<f64>();
    let n = lf.len() as f64;
    let (pf, pq) = ((nll(&lf) / n).exp(), (nll(&lq) / n).exp());
    let max_dev = lf
        .iter()
        .zip(&lq)
        .map(|(a, b)| (a.logprob - b.logprob).abs())
        .fold(0f32, f32::max);
    let mean_dev = lf
        .iter()
        .zip(&lq)
        .map(|(a, b)| f64::from((a.logprob - b.logprob).abs()))
        .sum::<f64>()
        / n;
    let top_agree = lf
        .iter()
        .zip(&lq)
        .filter(|(a, b)| a.top.first().map(|t| t.0) == b.top.first().map(|t| t.0))
        .count() as f64
        / n;
    eprintln!(
        "{} positions: perplexity f16 {pf:.4}, q8_0 {pq:.4} ({:+.3}%); token log-prob \
         deviation mean {mean_dev:.5}, max {max_dev:.4}; top-1 agreement {:.1}%; KV bytes \
         {bq} vs {bf}",
        lf.len(),
        100.0 * (pq / pf - 1.0),
        100.0 * top_agree
    );
    assert!((pq / pf - 1.0).abs() < 0.03, "perplexity {pf} -> {pq}");
    assert!(top_agree > 0.9, "top-1 agreement {top_agree}");
    assert!(!tq.is_empty() && !tf.is_empty());
}
