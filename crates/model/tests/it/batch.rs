//! Batching many sequences into one forward pass must not change any sequence's numbers:
//! the logits of a batched step are bit-identical to running each sequence alone.

use std::sync::Arc;

use souverain_model::{self as model, KvPool, LlamaModel, Logits, SeqChunk};

fn load() -> Option<LlamaModel> {
    let path = testkit::default_model()?;
    let file = Arc::new(model::gguf::GgufFile::open(&path).expect("open"));
    Some(LlamaModel::load(file, &mut |_, _| {}).expect("load"))
}

#[test]
fn batched_steps_equal_single_sequence_steps() {
    let Some(m) = load() else { return };
    let pool = model::ThreadPool::new(2);
    let prompts: [&[u32]; 3] = [&[504, 3575, 282, 4649, 314], &[1, 9690, 198], &[42; 21]];
    let follow: [u32; 3] = [7042, 198, 30];

    // Alone: each prompt, then one more token.
    let mut alone = Vec::new();
    for (p, &f) in prompts.iter().zip(&follow) {
        let mut kv = m.new_kv_cache(64).expect("kv");
        let first = m.forward(&pool, p, &mut kv, Logits::Last).expect("prompt");
        let second = m.forward(&pool, &[f], &mut kv, Logits::Last).expect("step");
        alone.push((first, second));
    }

    // Together in one pool, with interleaved, non-contiguous block tables.
    let bt = 4;
    let mut kv = KvPool::new(m.config(), bt, 32).expect("pool");
    let tables: [Vec<u32>; 3] = [vec![9, 2], vec![0, 7], vec![3, 31, 5, 11, 12, 20]];
    let step1: Vec<SeqChunk> = (0..3)
        .map(|i| SeqChunk {
            tokens: prompts[i],
            start_pos: 0,
            block_table: &tables[i],
            logits: Logits::Last,
            window_table: &[],
        })
        .collect();
    let first = m
        .forward_batch(&pool, &mut kv, &step1)
        .expect("batch prompt");
    let step2: Vec<SeqChunk> = (0..3)
        .map(|i| SeqChunk {
            tokens: std::slice::from_ref(&follow[i]),
            start_pos: prompts[i].len(),
            block_table: &tables[i],
            logits: Logits::Last,
            window_table: &[],
        })
        .collect();
    let second = m.forward_batch(&pool, &mut kv, &step2).expect("batch step");
    for i in 0..3 {
        assert_eq!(first[i], alone[i].0, "sequence {i}, prompt");
        assert_eq!(second[i], alone[i].1, "sequence {i}, step");
    }

    // A chunk that asks for no logits gets none; a table too short is an error.
    let none = SeqChunk {
        tokens: &[5, 6],
        start_pos: 0,
        block_table: &[1],
        logits: Logits::None,
        window_table: &[],
    };
    assert_eq!(
        m.forward_batch(&pool, &mut kv, &[none]).expect("none"),
        vec![Vec::<f32>::new()]
    );
    let short = SeqChunk {
        tokens: &[5; 6],
        start_pos: 0,
        block_table: &[1],
        logits: Logits::Last,
        window_table: &[],
    };
    assert!(m.forward_batch(&pool, &mut kv, &[short]).is_err());
    let outside = SeqChunk {
        block_table: &[99],
        ..none
    };
    assert!(m.forward_batch(&pool, &mut kv, &[outside]).is_err());
}

/// A single-sequence cache grown part way (`KvCache::grow`) goes on exactly as one made at
/// the larger size: the same logits, bit for bit, for prompt chunks and steps after the
/// growth; a growth past the context is refused and changes nothing.
#[test]
fn a_grown_cache_goes_on_as_a_large_one() {
    let Some(m) = load() else { return };
    let pool = model::ThreadPool::new(2);
    let tokens: Vec<u32> = (0..40u32).map(|i| 100 + (i * 7919) % 40_000).collect();
    let mut small = m.new_kv_cache(20).expect("kv");
    let mut large = m.new_kv_cache(64).expect("kv");
    let pieces = [0..18, 18..30, 30..31, 31..40];
    for (i, range) in pieces.into_iter().enumerate() {
        if i == 1 {
            let context = m.config().context_length;
            assert!(small.grow(m.config(), context + 1).is_err());
            assert_eq!(small.capacity(), 20);
            small.grow(m.config(), 64).expect("grow");
            assert_eq!((small.capacity(), small.len()), (64, 18));
            assert_eq!(small.bytes(), large.bytes());
        }
        let piece = &tokens[range];
        let a = m
            .forward(&pool, piece, &mut small, Logits::All)
            .expect("small");
        let b = m
            .forward(&pool, piece, &mut large, Logits::All)
            .expect("large");
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
