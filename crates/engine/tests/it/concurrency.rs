//! Continuous batching against one-at-a-time serving, on the default model.

use std::time::Duration;

use souverain_engine::{Engine, EngineConfig, EngineError, Event, FinishReason, GenerateRequest};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine(config: EngineConfig) -> Option<Engine> {
    let path = testkit::default_model()?;
    Some(Engine::load(&path, config, &mut |_, _| {}).expect("load"))
}

fn greedy(engine: &Engine, prompt: &str, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(engine.tokenize(prompt));
    r.sampling.temperature = 0.0;
    r.max_tokens = Some(max_tokens);
    r
}

/// Reads a generation to its end: (text, finish reason, completion tokens).
fn collect(mut rx: UnboundedReceiver<Event>) -> (String, FinishReason, usize) {
    let mut text = String::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Logprobs(_) | Event::PromptLogprobs(_) => {}
            Event::Done {
                finish_reason,
                usage,
            } => return (text, finish_reason, usage.completion_tokens),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the engine dropped the request")
}

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "List three colours:",
    "Write a haiku about the sea.\n",
    "1, 2, 3, 4,",
    "The best way to learn a language is to practise every day, because practice builds \
     habits, and habits make learning easier. In my experience,",
    "Q: What is the boiling point of water at sea level?\nA:",
];

#[test]
fn concurrent_greedy_outputs_equal_sequential_ones() {
    let Some(e) = engine(EngineConfig {
        threads: 2,
        max_seqs: 8,
        // Small steps so prompts are chunked and decode steps mix with prompt chunks.
        max_batch_tokens: 16,
        ..EngineConfig::default()
    }) else {
        return;
    };
    let lens = [24, 17, 30, 9, 20, 12, 28, 15];
    let sequential: Vec<_> = PROMPTS
        .iter()
        .zip(lens)
        .map(|(p, n)| collect(e.generate(greedy(&e, p, n)).expect("submit")))
        .collect();
    let receivers: Vec<_> = PROMPTS
        .iter()
        .zip(lens)
        .map(|(p, n)| e.generate(greedy(&e, p, n)).expect("submit"))
        .collect();
    let concurrent: Vec<_> = receivers.into_iter().map(collect).collect();
    for (i, (s, c)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(s, c, "request {i} differs under concurrency");
    }
    // Distinct prompts give distinct continuations (no sequence read another's cache).
    let distinct: std::collections::HashSet<_> = sequential.iter().map(|s| &s.0).collect();
    assert!(distinct.len() >= 6, "{sequential:?}");
    let m = wait_idle(&e);
    assert_eq!((m.kv_blocks_used, m.running, m.waiting), (0, 0, 0), "{m:?}");
}

/// The gauges are published after each step, a moment after the last event was sent: wait
/// (bounded) until the engine reports itself idle, and return what it reports.
fn wait_idle(e: &Engine) -> souverain_engine::MetricsSnapshot {
    let mut m = e.metrics();
    for _ in 0..500 {
        if m.kv_blocks_used == 0 && m.running == 0 && m.waiting == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        m = e.metrics();
    }
    m
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let Some(e) = engine(EngineConfig {
        threads: 2,
        ..EngineConfig::default()
    }) else {
        return;
    };
    let system = "You are a careful assistant. ".repeat(20);
    let first = collect(
        e.generate(greedy(&e, &format!("{system}Question one?"), 4))
            .expect("submit"),
    );
    let before = e.metrics();
    let second = collect(
        e.generate(greedy(&e, &format!("{system}Question two?"), 4))
            .expect("submit"),
    );
    let after = e.metrics();
    let hit = after.prefix_hit_tokens - before.prefix_hit_tokens;
    let shared_tokens = e.tokenize(&system).len();
    // Every whole block of the shared system prompt is found.
    assert!(
        hit as usize >= shared_tokens / 16 * 16 && hit > 0,
        "hit {hit} of {shared_tokens}"
    );
    // The same prompt again is found whole but for its last block, and answers the same.
    let again = collect(
        e.generate(greedy(&e, &format!("{system}Question one?"), 4))
            .expect("submit"),
    );
    assert_eq!(again, first);
    assert_ne!(second.0, "");
}

#[test]
fn random_disconnects_leave_no_blocks_held() {
    let Some(e) = engine(EngineConfig {
        threads: 2,
        max_seqs: 8,
        ..EngineConfig::default()
    }) else {
        return;
    };
    // A fixed pseudo-random schedule: each request is dropped after 0..4 events or read to
    // its end.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut open = Vec::new();
    for i in 0..200 {
        let prompt = format!("Request {i}: tell me about the number {}.", rand() % 1000);
        let mut r = greedy(&e, &prompt, 1 + (rand() % 24) as usize);
        r.sampling.temperature = 0.7;
        r.sampling.seed = Some(i);
        let rx = e.generate(r).expect("submit");
        open.push((rx, rand() % 6));
        // Keep a bounded number in flight; read or drop the oldest.
        if open.len() > 12 {
            let (mut rx, keep) = open.remove(0);
            for _ in 0..keep.min(4) {
                if rx.blocking_recv().is_none() {
                    break;
                }
            }
            if keep >= 4 {
                while rx.blocking_recv().is_some() {}
            }
        }
    }
    drop(open);
    // The engine notices dropped receivers at its next step.
    let m = wait_idle(&e);
    assert_eq!((m.kv_blocks_used, m.running, m.waiting), (0, 0, 0), "{m:?}");
    // Still answering.
    let (text, _, n) = collect(e.generate(greedy(&e, "Hello", 3)).expect("submit"));
    assert_eq!(n, 3, "{text:?}");
}

#[test]
fn a_full_queue_refuses_with_overloaded() {
    let Some(e) = engine(EngineConfig {
        threads: 1,
        max_seqs: 1,
        max_waiting: 2,
        ..EngineConfig::default()
    }) else {
        return;
    };
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match e.generate(greedy(&e, "Count slowly:", 200)) {
            Ok(rx) => held.push(rx),
            Err(EngineError::Overloaded { .. }) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(refused >= 3, "only {refused} refused");
    assert!(e.metrics().requests_rejected >= 3);
    drop(held);
}

#[test]
fn preemption_when_the_cache_runs_out_changes_no_output() {
    // 64 tokens of KV cache (4 blocks) for 4 sequences of ~30 tokens each: running them all
    // at once needs more blocks than exist, so younger sequences are preempted and recomputed.
    let Some(e) = engine(EngineConfig {
        threads: 2,
        max_seqs: 4,
        context_length: Some(64),
        kv_cache_tokens: Some(64),
        ..EngineConfig::default()
    }) else {
        return;
    };
    let prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[7]];
    let sequential: Vec<_> = prompts
        .iter()
        .map(|p| collect(e.generate(greedy(&e, p, 20)).expect("submit")))
        .collect();
    let before = e.metrics().preemptions;
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| e.generate(greedy(&e, p, 20)).expect("submit"))
        .collect();
    let concurrent: Vec<_> = receivers.into_iter().map(collect).collect();
    assert_eq!(sequential, concurrent);
    assert!(e.metrics().preemptions > before, "no preemption happened");
    let m = wait_idle(&e);
    assert_eq!(m.kv_blocks_used, 0);
}

#[test]
fn requests_arriving_together_compute_their_shared_prefix_once() {
    // Steps of 32 tokens: the shared system prompt (over three steps' worth) takes the
    // first request several steps, during which the others arrive and must wait for its
    // blocks rather than compute the same prefix beside it.
    let config = EngineConfig {
        threads: 2,
        max_seqs: 8,
        max_batch_tokens: 32,
        ..EngineConfig::default()
    };
    let Some(e) = engine(config.clone()) else {
        return;
    };
    let system = "The following is a conversation with a helpful assistant. The assistant is \
        friendly, precise and brief. It answers questions about geography, science, history, \
        animals and everyday life, and when it does not know something it says so plainly \
        rather than guessing. It never uses more words than it needs, it always writes in \
        complete sentences, and it checks its facts before it answers. It is patient with \
        beginners, it explains technical words when it must use them, and it gives an \
        example whenever an example makes the answer clearer. When a question has \
        several parts, it answers each part in turn, in the order they were asked.\n\n";
    let questions = [
        "Question: What is the capital of Italy?\nAnswer: The capital of Italy is",
        "Question: Why is the sky blue?\nAnswer: The sky is blue because",
        "Question: How many legs does a spider have?\nAnswer: A spider has",
        "Question: What do bees make?\nAnswer: Bees make",
    ];
    let requests: Vec<_> = questions
        .iter()
        .map(|q| greedy(&e, &format!("{system}{q}"), 8))
        .collect();
    let bt = e.metrics().kv_block_tokens as usize;
    let shared_tokens = e.tokenize(system).len();
    assert!(
        shared_tokens > 3 * config.max_batch_tokens,
        "the prefix should take several steps: {shared_tokens} tokens"
    );
    // All submitted before reading any event: the engine has at most started the first.
    let receivers: Vec<_> = requests
        .iter()
        .map(|r| e.generate(r.clone()).expect("submit"))
        .collect();
    let together: Vec<_> = receivers.into_iter().map(collect).collect();
    let m = wait_idle(&e);
    assert_eq!((m.kv_blocks_used, m.running, m.waiting), (0, 0, 0), "{m:?}");
    // The engine is new: every hit is a later request reusing what the first computed. Each
    // of the three later ones finds every whole block of the system prompt.
    let whole = shared_tokens / bt * bt;
    assert!(
        m.prefix_hit_tokens as usize >= 3 * whole,
        "hit {} tokens, want at least 3 x {whole}",
        m.prefix_hit_tokens
    );
    drop(e);
    // The same requests one at a time, on an engine of their own, answer the same.
    let Some(alone) = engine(config) else {
        return;
    };
    let one_at_a_time: Vec<_> = requests
        .into_iter()
        .map(|r| collect(alone.generate(r).expect("submit")))
        .collect();
    assert_eq!(together, one_at_a_time);
    let distinct: std::collections::HashSet<_> = together.iter().map(|t| &t.0).collect();
    assert!(distinct.len() >= 3, "{together:?}");
}

/// Batch work uses what interactive requests leave: at most half the running slots, and an
/// interactive request that arrives behind queued batch ones starts before them. Its output
/// is the one it has served alone.
#[test]
fn batch_requests_yield_to_interactive_ones() {
    let Some(e) = engine(EngineConfig {
        threads: 2,
        max_seqs: 2,
        ..EngineConfig::default()
    }) else {
        return;
    };
    let alone = collect(e.generate(greedy(&e, PROMPTS[0], 12)).unwrap()).0;
    let batch = |p: &str| {
        // Long enough (no early end) to outlast the interactive request.
        let mut r = greedy(&e, p, 200);
        r.stop_at_eog = false;
        r.priority = souverain_engine::Priority::Batch;
        r
    };
    let mut queued: Vec<_> = (0..3)
        .map(|i| {
            let rx = e.generate(batch(PROMPTS[1 + i])).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            rx
        })
        .collect();
    // One batch sequence runs (half of two slots); the others wait.
    std::thread::sleep(Duration::from_millis(100));
    let m = e.metrics();
    assert_eq!((m.running, m.waiting), (1, 2), "{m:?}");
    let (text, _, _) = collect(e.generate(greedy(&e, PROMPTS[0], 12)).unwrap());
    assert_eq!(text, alone);
    // The interactive request went ahead of the waiting batch ones: they have not started.
    for rx in &mut queued[1..] {
        assert!(
            rx.try_recv().is_err(),
            "a queued batch request started first"
        );
    }
    for rx in queued {
        assert_eq!(collect(rx).2, 200);
    }
}

/// With every slot taken by batch work, an interactive request takes a batch sequence's
/// slot: the batch one is preempted and recomputed later, and both answers are those they
/// give alone.
#[test]
fn an_interactive_request_takes_a_batch_sequences_slot() {
    let Some(e) = engine(EngineConfig {
        threads: 2,
        max_seqs: 1,
        ..EngineConfig::default()
    }) else {
        return;
    };
    let batch = || {
        let mut r = greedy(&e, PROMPTS[2], 120);
        r.stop_at_eog = false;
        r.priority = souverain_engine::Priority::Batch;
        r
    };
    let batch_alone = collect(e.generate(batch()).unwrap());
    let alone = collect(e.generate(greedy(&e, PROMPTS[0], 8)).unwrap()).0;
    let mut running = e.generate(batch()).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let (text, _, _) = collect(e.generate(greedy(&e, PROMPTS[0], 8)).unwrap());
    assert_eq!(text, alone);
    // The batch answer is not done yet (120 tokens), and comes out whole and unchanged.
    let mut got = String::new();
    let mut done = None;
    while let Some(event) = running.blocking_recv() {
        match event {
            Event::Text(t) => got.push_str(&t),
            Event::Done {
                finish_reason,
                usage,
            } => {
                done = Some((finish_reason, usage.completion_tokens));
                break;
            }
            Event::Logprobs(_) | Event::PromptLogprobs(_) => {}
            Event::Failed(e) => panic!("batch failed: {e}"),
        }
    }
    assert_eq!((got, done.unwrap().1), (batch_alone.0, batch_alone.2));
    assert!(e.metrics().preemptions >= 1);
}
