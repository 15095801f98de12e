//! The engine thread: continuous batching over a paged KV cache.
//!
//! Every step builds one batch: one token for each running sequence that is generating
//! (decode first, so streams keep flowing), then chunks of waiting prompts up to the step's
//! token budget (so a long prompt is processed over several steps instead of stalling the
//! others). The batch runs as one forward pass; each sequence whose last token was in it
//! samples its next token. Sequences join when they are admitted and leave when they finish
//! or their client goes away, at any step.
//!
//! Admission is first come, first served within a priority: interactive requests queue ahead
//! of every batch request (the Batch API's), and batch sequences hold at most half of the
//! running slots, so an interactive arrival never waits behind batch work. While an
//! interactive prompt is being processed, batch sequences sit its steps out, and batch
//! prompts take at most an eighth of a step's tokens: the step a request arrives during ends
//! soon and its own prompt's steps are as short as without batch work
//! (`scripts/bench/batch-ttft`). A new sequence first looks its tokens up in the
//! prefix cache and starts computing after the longest cached run of whole blocks. A block
//! enters the cache only once it is full and computed, so a sequence that arrives while
//! another with the same prefix is still in its prompt would find little and compute the
//! same blocks a second time: instead, a waiting sequence whose next uncached block is one
//! that a running sequence's prompt is still going to compute (same chained hash) is
//! deferred. It keeps its place in the queue, admission goes on with the sequences behind
//! it, and it is admitted at a later step, once those blocks are cached or the running
//! sequence is gone (finished, cancelled or preempted). A sequence that does not fit in the
//! free blocks stops admission, so none behind it overtakes it. When a running sequence
//! needs a block and none is free, the last running sequence (the most recently admitted
//! batch one if any, else the most recently admitted) is preempted: its blocks are released
//! and it goes back to the front of its class in the queue, to be recomputed (its
//! cached prefix usually survives, so recomputing is cheap).
//!
//! A sequence that asks for its prompt's log-probabilities gets the logits of every prompt
//! position (over however many steps its prompt takes) and skips the prefix cache, since a
//! cached position is never computed; the list is sent once, when the prompt is done, and a
//! recomputation after preemption does not send it again. Such a sequence is never deferred
//! (it would not use the blocks it waited for), but its own prompt blocks are registered as
//! any other's, so others may wait for them.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::text::{TextDecoder, TextTokenizer};
use model::{KvPool, LlamaModel, Logits, SeqChunk, ThreadPool};
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::{BlockManager, CHAIN_ROOT, chain_hash};
use crate::constraint::TokenConstraint;
use crate::energy::{CostModel, EnergyLedger};
use crate::metrics::Metrics;
use crate::reasoning::ReasoningCounter;
use crate::sampler::Sampler;
use crate::speculate::{ModelDraft, Speculation};
use crate::stop::{StopMatcher, StopOutcome};
use crate::{
    Energy, Event, Failure, FinishReason, GenerateRequest, Priority, TokenLogprobs, Usage,
};

/// `token`'s log-probability under `logits` (raw) with the `k` most likely alternatives,
/// each with its bytes.
fn token_logprobs(text: &TextTokenizer, logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let bytes = |t: u32| text.token_bytes(t).unwrap_or_default();
    let (logprob, top) = crate::sampler::logprobs(logits, token, k);
    TokenLogprobs {
        token,
        bytes: bytes(token),
        logprob,
        top: top.into_iter().map(|(t, lp)| (t, bytes(t), lp)).collect(),
    }
}

/// A request on its way to the engine thread.
pub(crate) struct Job {
    pub(crate) request: GenerateRequest,
    /// The request's grammar, compiled when it was submitted.
    pub(crate) constraint: Option<TokenConstraint>,
    pub(crate) events: UnboundedSender<Event>,
    pub(crate) arrival: Instant,
}

/// Limits the scheduler works within.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_seqs: usize,
    pub(crate) max_batch_tokens: usize,
    pub(crate) context_length: usize,
    /// N-gram speculation for generating sequences, when enabled.
    pub(crate) speculation: Option<Speculation>,
}

/// One request in flight.
struct Sequence {
    events: UnboundedSender<Event>,
    /// Still counted in the bounded queue (not yet admitted once).
    queued: bool,
    arrival: Instant,
    last_token_at: Option<Instant>,
    /// Prompt and generated tokens; the last generated one may not be computed yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    n_computed: usize,
    /// The sequence's blocks, in position order.
    blocks: Vec<u32>,
    /// Its window blocks (the sliding-window layers' own, when the scheduler has them),
    /// indexed like `blocks`: [`GONE`] for those that left its window and were given back.
    window: Vec<u32>,
    /// Chained hashes of the blocks registered in the prefix cache so far.
    hashes: Vec<u64>,
    /// Chained hashes of the prompt's whole blocks, computed once on arrival: block `i` of
    /// the prompt is registered under `prompt_chain[i]`.
    prompt_chain: Vec<u64>,
    generated: usize,
    max_new: usize,
    stop_at_eog: bool,
    logprobs: Option<usize>,
    /// Alternatives per prompt position; `None` once the prompt's log-probabilities are sent
    /// (or when none were asked for).
    prompt_logprobs: Option<usize>,
    /// The prompt's log-probabilities gathered so far (entry `i` is prompt token `i + 1`).
    prompt_lp: Vec<TokenLogprobs>,
    sampler: Sampler,
    decoder: TextDecoder,
    stops: StopMatcher,
    /// Constrained decoding: masks the logits before each draw; `None` costs nothing.
    constraint: Option<TokenConstraint>,
    /// Counts the tokens inside the reasoning block, when asked.
    reasoning: Option<ReasoningCounter>,
    /// Microjoules of the steps it was in (recomputation after preemption included).
    energy_uj: u64,
    priority: Priority,
    /// The draft model's state for this sequence (`--draft-model`), made at its first draft.
    draft: Option<ModelDraft>,
    /// Where the request also sees each step's energy (`GenerateRequest::energy_tap`).
    energy_tap: Option<Arc<crate::EnergyTap>>,
}

impl Sequence {
    fn new(job: Job, context_length: usize, block_tokens: usize, text: &TextTokenizer) -> Self {
        let r = job.request;
        let room = context_length.saturating_sub(r.prompt_tokens.len());
        let mut parent = CHAIN_ROOT;
        let prompt_chain = r
            .prompt_tokens
            .chunks_exact(block_tokens)
            .map(|chunk| {
                parent = chain_hash(parent, chunk);
                parent
            })
            .collect();
        Self {
            events: job.events,
            queued: true,
            arrival: job.arrival,
            last_token_at: None,
            prompt_len: r.prompt_tokens.len(),
            tokens: r.prompt_tokens,
            n_computed: 0,
            blocks: Vec::new(),
            window: Vec::new(),
            hashes: Vec::new(),
            prompt_chain,
            generated: 0,
            max_new: r.max_tokens.map_or(room, |m| m.min(room)),
            stop_at_eog: r.stop_at_eog,
            logprobs: r.logprobs,
            prompt_logprobs: r.prompt_logprobs,
            prompt_lp: Vec::new(),
            sampler: Sampler::new(r.sampling),
            decoder: text.stream_decoder(r.keep_special),
            stops: StopMatcher::new(r.stop),
            constraint: job.constraint,
            reasoning: r.reasoning.map(ReasoningCounter::new),
            energy_uj: 0,
            priority: r.priority,
            draft: None,
            energy_tap: r.energy_tap,
        }
    }

    /// Chained hashes of the prompt blocks this sequence (running) is still going to compute
    /// and register: those past the ones it has registered. Empty once its prompt is done.
    fn pending_prompt_blocks(&self) -> &[u64] {
        self.prompt_chain
            .get(self.hashes.len()..)
            .unwrap_or_default()
    }

    fn usage(&self, energy: &EnergyLedger) -> Usage {
        Usage {
            energy: Some(Energy {
                microjoules: self.energy_uj,
                kind: energy.kind(),
            }),
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            reasoning_tokens: self.reasoning.as_ref().map_or(0, ReasoningCounter::count),
        }
    }
}

/// A window-table entry whose block was given back (it left the sequence's window).
const GONE: u32 = u32::MAX;

/// The sliding-window layers' own blocks: a sequence holds only those its window still
/// reaches (from the block of `n_computed + 1 - size` on), allocated as its positions are
/// computed and given back as they leave the window; full ones are registered in their own
/// prefix cache under the same chained hashes as the full-attention blocks.
struct WindowBlocks {
    blocks: BlockManager,
    /// The model's sliding window, in positions.
    size: usize,
}

impl WindowBlocks {
    /// The first block a row at position `pos` or later reads.
    fn first_needed(&self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.size) / self.blocks.block_tokens()
    }
}

/// The engine thread's state.
pub(crate) struct Scheduler {
    model: LlamaModel,
    /// The draft model (`--draft-model`): drafts come from it instead of n-grams.
    draft_model: Option<(LlamaModel, CostModel)>,
    tokenizer: Arc<TextTokenizer>,
    pool: ThreadPool,
    kv: KvPool,
    blocks: BlockManager,
    /// The window blocks, when the pool has fewer of them than blocks.
    window: Option<WindowBlocks>,
    limits: Limits,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    energy: EnergyLedger,
    cost: CostModel,
}

/// What happened to a sequence in a step.
enum Outcome {
    Continue,
    /// Ended without `Done` (failed, or its client went away).
    Finished,
    /// Ended normally: `Done` is sent once the step's energy is known.
    Done(FinishReason),
}

/// How long the idle engine waits for a job before reading the energy meter again (so that
/// idle energy shows in `/metrics` and a wrapping counter is never read too rarely).
const IDLE_METER_PERIOD: Duration = Duration::from_secs(1);

impl Scheduler {
    pub(crate) fn new(
        model: LlamaModel,
        tokenizer: Arc<TextTokenizer>,
        pool: ThreadPool,
        kv: KvPool,
        limits: Limits,
        metrics: Arc<Metrics>,
        (energy, cost): (EnergyLedger, CostModel),
    ) -> Self {
        let blocks = BlockManager::new(kv.n_blocks(), kv.block_tokens());
        metrics.kv_blocks_total.store(kv.n_blocks() as u64, Relaxed);
        let window = match model.config().sliding_window {
            Some(size) if kv.n_window_blocks() > 0 && kv.n_window_blocks() < kv.n_blocks() => {
                Some(WindowBlocks {
                    blocks: BlockManager::new(kv.n_window_blocks(), kv.block_tokens()),
                    size,
                })
            }
            _ => None,
        };
        if let Some(w) = &window {
            metrics
                .kv_window_blocks_total
                .store(w.blocks.total() as u64, Relaxed);
        }
        metrics
            .kv_block_tokens
            .store(kv.block_tokens() as u64, Relaxed);
        Self {
            model,
            draft_model: None,
            tokenizer,
            pool,
            kv,
            blocks,
            window,
            limits,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            energy,
            cost,
        }
    }

    /// Drafts from `draft` (a model of the target's vocabulary) instead of n-grams.
    /// `cost` weighs the draft model's work, charged to the sequence it drafted for.
    pub(crate) fn with_draft_model(mut self, draft: LlamaModel, cost: CostModel) -> Self {
        self.draft_model = Some((draft, cost));
        self
    }

    /// Runs until every `Engine` handle is gone and no work is left.
    pub(crate) fn run(mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match jobs.recv_timeout(IDLE_METER_PERIOD) {
                    Ok(job) => self.enqueue(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.energy.tick();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.enqueue(job);
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                // A model error here is a bug or a broken file, not a bad request: fail the
                // sequences of this step and keep serving.
                tracing::error!(error = %e, "forward pass failed");
                // Whatever returned the error, no step of this engine stays open on the
                // account (a step already charged leaves nothing to close).
                self.energy.step(&[]);
                let failure = Failure::Forward(Arc::new(e));
                for seq in std::mem::take(&mut self.running) {
                    let _ = seq.events.send(Event::Failed(failure.clone()));
                    self.finish(seq);
                }
            }
            self.publish_gauges();
        }
    }

    fn enqueue(&mut self, job: Job) {
        let seq = Sequence::new(
            job,
            self.limits.context_length,
            self.blocks.block_tokens(),
            &self.tokenizer,
        );
        self.wait(seq, false);
    }

    /// Queues `seq`: interactive sequences before every batch one, each class in arrival
    /// order; `front` puts it first in its class (a preempted sequence).
    fn wait(&mut self, seq: Sequence, front: bool) {
        let class_start = |q: &VecDeque<Sequence>, p: Priority| {
            q.iter().position(|s| s.priority == p).unwrap_or(q.len())
        };
        let at = match (seq.priority, front) {
            (Priority::Interactive, true) => 0,
            (Priority::Interactive, false) | (Priority::Batch, true) => {
                class_start(&self.waiting, Priority::Batch)
            }
            (Priority::Batch, false) => self.waiting.len(),
        };
        self.waiting.insert(at, seq);
    }

    /// Most batch sequences running at once: half the slots, so that interactive requests
    /// always find room.
    fn batch_slots(&self) -> usize {
        (self.limits.max_seqs / 2).max(1)
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.running.store(self.running.len() as u64, Relaxed);
        m.waiting.store(self.waiting.len() as u64, Relaxed);
        m.kv_blocks_used.store(self.blocks.in_use() as u64, Relaxed);
        if let Some(w) = &self.window {
            m.kv_window_blocks_used
                .store(w.blocks.in_use() as u64, Relaxed);
        }
    }

    /// Gives back the window blocks in `window` (all but the [`GONE`] ones) and empties it.
    fn release_window(&mut self, window: &mut Vec<u32>) {
        if let Some(w) = &mut self.window {
            for &b in window.iter().filter(|&&b| b != GONE) {
                w.blocks.release(b);
            }
        }
        window.clear();
    }

    /// Gives back sequence `i`'s window blocks that no row at `n_computed` or later reads.
    fn trim_window(&mut self, i: usize) {
        let Some(w) = &mut self.window else { return };
        let seq = &mut self.running[i];
        let first = w.first_needed(seq.n_computed).min(seq.window.len());
        for b in &mut seq.window[..first] {
            if *b != GONE {
                w.blocks.release(*b);
                *b = GONE;
            }
        }
    }

    /// Makes sure sequence `i` has window blocks for every position before `end` that its
    /// window reaches. False when the window blocks ran out (the pool is sized so that the
    /// running sequences always fit: see `Engine::load`).
    fn ensure_window(&mut self, i: usize, end: usize) -> bool {
        let Some(w) = &mut self.window else {
            return true;
        };
        let seq = &mut self.running[i];
        let first = w.first_needed(seq.n_computed);
        while seq.window.len() * w.blocks.block_tokens() < end {
            if seq.window.len() < first {
                seq.window.push(GONE);
                continue;
            }
            match w.blocks.allocate() {
                Some(b) => seq.window.push(b),
                None => return false,
            }
        }
        true
    }

    /// For a new sequence sharing the cached blocks `shared` of its prefix: the window
    /// blocks its window reaches at the end of that prefix, held from the window blocks'
    /// prefix cache. When some are no longer cached, the shared run is cut back (its blocks
    /// released) until the window blocks of its end are all there, or nothing is shared.
    /// Returns the sequence's window table.
    fn hold_window_prefix(&mut self, seq: &Sequence, shared: &mut Vec<u32>) -> Vec<u32> {
        let Some(w) = &mut self.window else {
            return Vec::new();
        };
        let bt = w.blocks.block_tokens();
        // The chained hashes of the shared blocks (the prompt's are known).
        let mut chain: Vec<u64> = seq
            .prompt_chain
            .iter()
            .take(shared.len())
            .copied()
            .collect();
        let mut parent = chain.last().copied().unwrap_or(CHAIN_ROOT);
        for chunk in seq
            .tokens
            .chunks_exact(bt)
            .take(shared.len())
            .skip(chain.len())
        {
            parent = chain_hash(parent, chunk);
            chain.push(parent);
        }
        'cut: while !shared.is_empty() {
            let first = w.first_needed(shared.len() * bt);
            let mut table = vec![GONE; first];
            for (k, &hash) in chain.iter().enumerate().take(shared.len()).skip(first) {
                match w
                    .blocks
                    .hold_cached(hash, &seq.tokens[k * bt..(k + 1) * bt])
                {
                    Some(b) => table.push(b),
                    None => {
                        for &b in table.iter().filter(|&&b| b != GONE) {
                            w.blocks.release(b);
                        }
                        for b in shared.drain(k..) {
                            self.blocks.release(b);
                        }
                        continue 'cut;
                    }
                }
            }
            return table;
        }
        Vec::new()
    }

    /// Frees the blocks of sequences whose client has gone.
    fn drop_cancelled(&mut self) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.events.is_closed());
        self.running = kept;
        for seq in gone {
            self.finish(seq);
        }
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|s| s.events.is_closed());
        self.waiting = kept;
        for seq in gone {
            self.finish(seq);
        }
    }

    /// Releases a sequence's blocks and counts it as finished.
    fn finish(&mut self, mut seq: Sequence) {
        for &b in &seq.blocks {
            self.blocks.release(b);
        }
        self.release_window(&mut seq.window);
        self.metrics.requests_finished.fetch_add(1, Relaxed);
        self.metrics
            .request_latency
            .observe(seq.arrival.elapsed().as_secs_f64());
        if seq.queued {
            self.metrics.queued.fetch_sub(1, Relaxed);
        }
    }

    /// Moves waiting sequences into the running set while there is room, oldest first,
    /// skipping (deferring) those whose next uncached block a running prompt is computing.
    fn admit(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let bt = self.blocks.block_tokens();
        // Blocks that running prompts will register: sequences admitted in this call join,
        // so requests that arrive together wait for the first of them.
        let mut pending: HashSet<u64> = self
            .running
            .iter()
            .flat_map(|s| s.pending_prompt_blocks().iter().copied())
            .collect();
        let mut i = 0;
        let mut batch_running = self
            .running
            .iter()
            .filter(|s| s.priority == Priority::Batch)
            .count();
        while let Some(seq) = self.waiting.get(i) {
            if self.running.len() >= self.limits.max_seqs {
                // Full: an interactive sequence takes a batch sequence's slot (the batch one
                // goes back to the queue, to be recomputed later); anything else waits.
                if seq.priority == Priority::Interactive && self.preempt_batch() {
                    batch_running = batch_running.saturating_sub(1);
                    continue;
                }
                break;
            }
            // Batch sequences queue behind every interactive one: past the batch share,
            // nothing further can start.
            if seq.priority == Priority::Batch && batch_running >= self.batch_slots() {
                break;
            }
            let positions = seq.tokens.len();
            let needed = positions.div_ceil(bt);
            if needed > self.blocks.total() {
                // Can never fit: the KV budget is smaller than this sequence.
                if let Some(seq) = self.waiting.remove(i) {
                    let _ = seq.events.send(Event::Failed(Failure::KvCacheTooSmall {
                        needed_tokens: positions,
                        capacity_tokens: self.blocks.total() * bt,
                    }));
                    self.finish(seq);
                }
                continue;
            }
            // A sequence asking for prompt log-probabilities skips the cache: nothing to wait
            // for. The others wait when their next uncached block is on its way.
            if seq.prompt_logprobs.is_none() && !pending.is_empty() {
                let cached = self.blocks.cached_run(&seq.prompt_chain, &seq.tokens);
                if seq
                    .prompt_chain
                    .get(cached)
                    .is_some_and(|h| pending.contains(h))
                {
                    i += 1;
                    continue;
                }
            }
            // Reuse the cached prefix; always leave at least one token to compute, since
            // its logits are what the next token is sampled from.
            let Some(mut seq) = self.waiting.remove(i) else {
                break;
            };
            // Cached positions are never computed, so they would have no logits.
            let mut shared = if seq.prompt_logprobs.is_some() {
                Vec::new()
            } else {
                self.blocks.match_prefix(&seq.tokens)
            };
            if shared.len() * bt >= positions
                && let Some(b) = shared.pop()
            {
                self.blocks.release(b);
            }
            let mut window = self.hold_window_prefix(&seq, &mut shared);
            if self.blocks.available() < needed - shared.len() {
                // Does not fit now: it keeps its place and nothing behind it overtakes it. An
                // interactive sequence first takes the blocks of batch sequences.
                for b in shared {
                    self.blocks.release(b);
                }
                self.release_window(&mut window);
                let interactive = seq.priority == Priority::Interactive;
                self.waiting.insert(i, seq);
                if interactive && self.preempt_batch() {
                    batch_running = batch_running.saturating_sub(1);
                    continue;
                }
                break;
            }
            // The prompt's hashes are known; a recomputed sequence's shared run may go on
            // into its generated tokens, which are hashed here.
            seq.hashes
                .extend(seq.prompt_chain.iter().take(shared.len()).copied());
            let mut parent = seq.hashes.last().copied().unwrap_or(CHAIN_ROOT);
            for chunk in seq
                .tokens
                .chunks_exact(bt)
                .take(shared.len())
                .skip(seq.hashes.len())
            {
                parent = chain_hash(parent, chunk);
                seq.hashes.push(parent);
            }
            seq.n_computed = shared.len() * bt;
            self.metrics
                .prefix_query_tokens
                .fetch_add(positions as u64, Relaxed);
            self.metrics
                .prefix_hit_tokens
                .fetch_add(seq.n_computed as u64, Relaxed);
            if seq.generated == 0 {
                self.metrics
                    .prompt_tokens
                    .fetch_add(seq.prompt_len as u64, Relaxed);
            }
            if seq.queued {
                seq.queued = false;
                self.metrics.queued.fetch_sub(1, Relaxed);
            }
            seq.blocks = shared;
            seq.window = window;
            while seq.blocks.len() < needed {
                match self.blocks.allocate() {
                    Some(b) => seq.blocks.push(b),
                    None => break, // cannot happen: availability was checked above
                }
            }
            pending.extend(seq.pending_prompt_blocks().iter().copied());
            // Interactive sequences run ahead of batch ones (their prompt chunks get the
            // step's tokens first), and batch ones, last, are the first preempted.
            match seq.priority {
                Priority::Interactive => {
                    let at = self
                        .running
                        .iter()
                        .position(|s| s.priority == Priority::Batch)
                        .unwrap_or(self.running.len());
                    self.running.insert(at, seq);
                }
                Priority::Batch => {
                    batch_running += 1;
                    self.running.push(seq);
                }
            }
        }
    }

    /// Makes sure sequence `i` has a block for position `pos`, preempting younger sequences
    /// when the pool is full. Returns false if `i` itself had to be preempted.
    fn ensure_block(&mut self, i: usize, pos: usize) -> bool {
        let bt = self.blocks.block_tokens();
        while self.running[i].blocks.len() * bt <= pos {
            if let Some(b) = self.blocks.allocate() {
                self.running[i].blocks.push(b);
                continue;
            }
            // Preempt the most recently admitted sequence (the last one).
            let Some(victim) = self.running.pop() else {
                return false;
            };
            self.preempt(victim);
            if i >= self.running.len() {
                return false;
            }
        }
        true
    }

    /// Preempts the most recently admitted running batch sequence (running sequences keep
    /// batch ones last); false when none runs.
    fn preempt_batch(&mut self) -> bool {
        if self
            .running
            .last()
            .is_none_or(|s| s.priority != Priority::Batch)
        {
            return false;
        }
        match self.running.pop() {
            Some(victim) => {
                self.preempt(victim);
                true
            }
            None => false,
        }
    }

    fn preempt(&mut self, mut seq: Sequence) {
        self.metrics.preemptions.fetch_add(1, Relaxed);
        for &b in &seq.blocks {
            self.blocks.release(b);
        }
        seq.blocks.clear();
        self.release_window(&mut seq.window);
        seq.hashes.clear();
        seq.n_computed = 0;
        // Gathered again from the start when the prompt is recomputed.
        seq.prompt_lp.clear();
        // The draft model's cache goes too (made again at the next draft).
        seq.draft = None;
        self.wait(seq, true);
    }

    /// One batched forward pass and its sampling.
    fn step(&mut self) -> Result<(), model::ModelError> {
        if self.running.is_empty() {
            return Ok(());
        }
        // Decode tokens first: each generating sequence needs room for one more position.
        let mut i = 0;
        while i < self.running.len() {
            let pos = self.running[i].n_computed;
            if self.ensure_block(i, pos) {
                i += 1;
            }
        }
        // Plan: (sequence index, number of tokens to run this step). While an interactive
        // prompt is being processed, batch sequences sit the step out: the prompt's step is as
        // short as without them, so batch work does not delay a first token.
        let mut budget = self.limits.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let interactive_prompt = self
            .running
            .iter()
            .any(|s| s.priority == Priority::Interactive && s.tokens.len() - s.n_computed > 1);
        let steps = |seq: &Sequence| !(interactive_prompt && seq.priority == Priority::Batch);
        for (i, seq) in self.running.iter().enumerate() {
            let todo = seq.tokens.len() - seq.n_computed;
            if todo == 1 && steps(seq) {
                plan.push((i, 1));
                budget = budget.saturating_sub(1);
            }
        }
        // What came since the last reading (between steps) is idle, or other engines'; the
        // step, drafting included (a draft model computes), starts now.
        self.energy.begin();
        // Drafts of the generating sequences (`crate::speculate`), in the budget left by the
        // decode tokens and before prompt chunks; each goes with its sequence's plan entry.
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); plan.len()];
        // The draft model's work for each (cost model units), its sequence's to pay.
        let mut draft_weights = vec![0.0; plan.len()];
        if let Some(spec) = self.limits.speculation {
            for (p, d) in drafts.iter_mut().enumerate() {
                let i = plan[p].0;
                (*d, draft_weights[p]) = self.draft_for(&spec, i, budget);
                budget -= d.len();
                plan[p].1 += d.len();
            }
        }
        // Batch prompts take at most an eighth of a step's tokens, so that a step an
        // interactive request arrives during ends soon.
        let mut batch_budget = (self.limits.max_batch_tokens / 8).max(1);
        for (i, seq) in self.running.iter().enumerate() {
            let todo = seq.tokens.len() - seq.n_computed;
            let batch = seq.priority == Priority::Batch;
            let room = if batch {
                budget.min(batch_budget)
            } else {
                budget
            };
            if todo > 1 && room > 0 && steps(seq) {
                let n = todo.min(room);
                plan.push((i, n));
                budget -= n;
                if batch {
                    batch_budget -= n;
                }
            }
        }
        if plan.is_empty() {
            // Nothing to compute after all: the step closes at once (its energy, drafting's
            // if any, is idle's).
            self.energy.step(&[]);
            return Ok(());
        }
        for &(i, n) in &plan {
            let end = self.running[i].n_computed + n;
            if !self.ensure_window(i, end) {
                // The step computes nothing: it closes now (idle's), not left open.
                self.energy.step(&[]);
                return Err(model::ModelError::BadConfig(
                    "the KV pool's window blocks ran out (a bug: they are sized for every \
                     running sequence)"
                        .into(),
                ));
            }
        }
        // Prompt chunks have no draft.
        drafts.resize(plan.len(), Vec::new());
        draft_weights.resize(plan.len(), 0.0);
        // A speculating sequence runs its pending token and its draft.
        let spec_tokens: Vec<Vec<u32>> = plan
            .iter()
            .zip(&drafts)
            .map(|(&(i, _), d)| {
                if d.is_empty() {
                    return Vec::new();
                }
                let s = &self.running[i];
                let mut t = vec![s.tokens[s.n_computed]];
                t.extend_from_slice(d);
                t
            })
            .collect();
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .zip(&spec_tokens)
            .map(|(&(i, n), spec)| {
                let s = &self.running[i];
                if !spec.is_empty() {
                    return SeqChunk {
                        tokens: spec,
                        start_pos: s.n_computed,
                        block_table: &s.blocks,
                        logits: Logits::All,
                        window_table: &s.window,
                    };
                }
                let end = s.n_computed + n;
                SeqChunk {
                    tokens: &s.tokens[s.n_computed..end],
                    start_pos: s.n_computed,
                    block_table: &s.blocks,
                    logits: if s.prompt_logprobs.is_some() {
                        Logits::All
                    } else if end == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                    window_table: &s.window,
                }
            })
            .collect();
        let weights: Vec<f64> = plan
            .iter()
            .enumerate()
            .map(|(p, &(i, n))| self.cost.chunk(self.running[i].n_computed, n) + draft_weights[p])
            .collect();
        // What the step computes, for the step trace (`RUST_LOG=souverain::step=debug`): the
        // planner's CPU profile costs steps by these terms (`souverain_plan::cpu`).
        let started = Instant::now();
        let (mut decode_seqs, mut decode_context, mut prompt_tokens) = (0usize, 0usize, 0usize);
        if tracing::enabled!(target: "souverain::step", tracing::Level::DEBUG) {
            for &(i, n) in &plan {
                let s = &self.running[i];
                if s.tokens.len() - s.n_computed == 1 {
                    decode_seqs += 1;
                    decode_context += s.n_computed;
                } else {
                    prompt_tokens += n;
                }
            }
        }
        let logits = self.model.forward_batch(&self.pool, &mut self.kv, &chunks);
        let forward_us = started.elapsed().as_micros() as u64;
        drop(chunks);
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                self.charge_step(&plan, &weights);
                return Err(e);
            }
        };

        let mut ended = Vec::new();
        for ((&(i, n), mut logits), draft) in plan.iter().zip(logits).zip(&drafts) {
            if !draft.is_empty() {
                match self.verify(i, draft, &mut logits) {
                    Outcome::Continue => {}
                    outcome => ended.push((i, outcome)),
                }
                continue;
            }
            if self.running[i].prompt_logprobs.is_some() {
                logits = self.gather_prompt_logprobs(i, n, logits);
            }
            self.running[i].n_computed += n;
            self.register_full_blocks(i);
            self.trim_window(i);
            if logits.is_empty() {
                continue;
            }
            match self.sample_and_emit(i, &mut logits) {
                Outcome::Continue => {}
                outcome => ended.push((i, outcome)),
            }
        }
        // The step (forward pass and sampling) is over: its energy goes to its sequences
        // before those that ended are told their usage.
        self.charge_step(&plan, &weights);
        tracing::debug!(
            target: "souverain::step",
            decode_seqs,
            decode_context,
            prompt_tokens,
            chunks = plan.len(),
            waiting = self.waiting.len(),
            forward_us,
            us = started.elapsed().as_micros() as u64,
            "step"
        );
        ended.sort_unstable_by_key(|&(i, _)| i);
        for (i, outcome) in ended.into_iter().rev() {
            let seq = self.running.remove(i);
            if let Outcome::Done(finish_reason) = outcome {
                let usage = seq.usage(&self.energy);
                let _ = seq.events.send(Event::Done {
                    finish_reason,
                    usage,
                });
            }
            self.finish(seq);
        }
        Ok(())
    }

    /// The draft for generating sequence `i` (at most `budget` tokens) and the draft model's
    /// work for it (cost model units; 0 for n-gram drafts), with the KV blocks
    /// its positions need taken from the free ones (a draft never preempts anyone; it is
    /// cut where the free blocks, the context or the token limit end, and a draft model's
    /// before its first token below `--draft-p-min`).
    fn draft_for(&mut self, spec: &Speculation, i: usize, budget: usize) -> (Vec<u32>, f64) {
        let seq = &self.running[i];
        let pos = seq.n_computed;
        // A prompt whose log-probabilities are still to be sent ends through the plain path
        // (which gathers and sends them before any text).
        if seq.prompt_logprobs.is_some() {
            return (Vec::new(), 0.0);
        }
        // Positions pos + 1 ..= pos + k must be inside the context, and the step emits at
        // most k + 1 tokens.
        let limit = budget
            .min(self.limits.context_length.saturating_sub(pos + 1))
            .min(seq.max_new.saturating_sub(seq.generated + 1));
        let mut weight = 0.0;
        let mut draft = match &self.draft_model {
            Some((dm, cost)) => {
                let seq = &mut self.running[i];
                let max_capacity = (seq.prompt_len + seq.max_new).max(seq.tokens.len());
                let mut draft;
                (draft, weight) = seq
                    .draft
                    .get_or_insert_with(|| ModelDraft::new(max_capacity))
                    .draft(
                        dm,
                        &self.pool,
                        &seq.tokens,
                        (
                            limit.min(spec.draft_max),
                            self.limits.max_batch_tokens,
                            spec.draft_p_min,
                        ),
                        cost,
                    );
                // A draft model's vocabulary may run past the target's (checked at load).
                let vocab = self.model.config().vocab_size;
                if let Some(cut) = draft.iter().position(|&t| t as usize >= vocab) {
                    draft.truncate(cut);
                }
                draft
            }
            None => spec.draft(&seq.tokens, limit),
        };
        let bt = self.blocks.block_tokens();
        while self.running[i].blocks.len() * bt <= pos + draft.len() {
            match self.blocks.allocate() {
                Some(b) => self.running[i].blocks.push(b),
                None => {
                    let room = (self.running[i].blocks.len() * bt).saturating_sub(pos + 1);
                    draft.truncate(room);
                    break;
                }
            }
        }
        (draft, weight)
    }

    /// Verifies sequence `i`'s draft against the logits of its pending token and draft
    /// positions (`(draft.len() + 1) × vocab`): samples position by position as a step
    /// without speculation would, and stops at the first token that differs from the draft
    /// (emitted: it is the model's) or when the sequence ends. The positions up to the last
    /// accepted draft token hold valid keys and values.
    fn verify(&mut self, i: usize, draft: &[u32], logits: &mut [f32]) -> Outcome {
        let n = draft.len() + 1;
        let vocab = logits.len() / n;
        let mut accepted = 0;
        let mut outcome = Outcome::Continue;
        if vocab > 0 {
            for (j, row) in logits.chunks_exact_mut(vocab).enumerate() {
                outcome = self.sample_and_emit(i, row);
                if !matches!(outcome, Outcome::Continue) {
                    break;
                }
                match draft.get(j) {
                    Some(&d) if self.running[i].tokens.last() == Some(&d) => accepted += 1,
                    _ => break,
                }
            }
        }
        self.metrics
            .spec_draft_tokens
            .fetch_add(draft.len() as u64, Relaxed);
        self.metrics
            .spec_accepted_tokens
            .fetch_add(accepted as u64, Relaxed);
        self.running[i].n_computed += 1 + accepted;
        self.register_full_blocks(i);
        self.trim_window(i);
        outcome
    }

    /// Reads the meter at the end of a step and adds each chunk's share to its sequence.
    fn charge_step(&mut self, plan: &[(usize, usize)], weights: &[f64]) {
        let parts = self.energy.step(weights);
        let kind = self.energy.kind();
        for (&(i, _), uj) in plan.iter().zip(parts) {
            if let Some(seq) = self.running.get_mut(i) {
                seq.energy_uj = seq.energy_uj.saturating_add(uj);
                if let Some(tap) = &seq.energy_tap {
                    tap.add(uj, kind);
                }
            }
        }
    }

    /// Takes the logits of every position of sequence `i`'s `n`-token chunk (not yet counted
    /// in `n_computed`): each position but the prompt's last gives the log-probability of
    /// the prompt token after it. When the chunk ends the prompt, sends the list and returns
    /// the last position's logits (to sample from); otherwise returns nothing.
    fn gather_prompt_logprobs(&mut self, i: usize, n: usize, all: Vec<f32>) -> Vec<f32> {
        let seq = &mut self.running[i];
        let Some(k) = seq.prompt_logprobs else {
            return all;
        };
        if n == 0 || all.is_empty() || !all.len().is_multiple_of(n) {
            return Vec::new();
        }
        let vocab = all.len() / n;
        let start = seq.n_computed;
        for (j, row) in all.chunks_exact(vocab).enumerate() {
            let Some(&token) = seq.tokens.get(start + j + 1) else {
                break;
            };
            seq.prompt_lp
                .push(token_logprobs(&self.tokenizer, row, token, k));
        }
        if start + n < seq.tokens.len() {
            return Vec::new();
        }
        // The prompt is done: send once (a recomputation after preemption asks for no more).
        seq.prompt_logprobs = None;
        let _ = seq
            .events
            .send(Event::PromptLogprobs(std::mem::take(&mut seq.prompt_lp)));
        let mut all = all;
        all.drain(..(n - 1) * vocab);
        all
    }

    /// Puts the sequence's newly completed blocks into the prefix cache.
    fn register_full_blocks(&mut self, i: usize) {
        let bt = self.blocks.block_tokens();
        let seq = &mut self.running[i];
        while (seq.hashes.len() + 1) * bt <= seq.n_computed {
            let k = seq.hashes.len();
            let tokens = &seq.tokens[k * bt..(k + 1) * bt];
            let hash = match seq.prompt_chain.get(k) {
                Some(&hash) => hash,
                None => chain_hash(seq.hashes.last().copied().unwrap_or(CHAIN_ROOT), tokens),
            };
            self.blocks.register(seq.blocks[k], hash, tokens);
            if let Some(w) = &mut self.window
                && let Some(&b) = seq.window.get(k).filter(|&&b| b != GONE)
            {
                w.blocks.register(b, hash, tokens);
            }
            seq.hashes.push(hash);
        }
    }

    /// Samples sequence `i`'s next token and streams its text.
    fn sample_and_emit(&mut self, i: usize, logits: &mut [f32]) -> Outcome {
        let now = Instant::now();
        let seq = &mut self.running[i];
        // Log-probabilities come from the raw logits, before the sampler changes them.
        let raw = seq.logprobs.map(|k| (k, logits.to_vec()));
        if let Some(c) = &mut seq.constraint
            && let Err(e) = c.mask(logits)
        {
            let _ = seq.events.send(Event::Failed(Failure::Constraint(e)));
            return Outcome::Finished;
        }
        let token = seq.sampler.sample(logits, &seq.tokens, seq.generated);
        seq.tokens.push(token);
        seq.generated += 1;
        self.metrics.generation_tokens.fetch_add(1, Relaxed);
        match seq.last_token_at {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - seq.arrival).as_secs_f64()),
            Some(t) => self
                .metrics
                .inter_token_latency
                .observe((now - t).as_secs_f64()),
        }
        seq.last_token_at = Some(now);

        let send = |seq: &Sequence, e: Event| seq.events.send(e).is_ok();
        let ends_here = seq.stop_at_eog && self.tokenizer.is_eog(token);
        if let Some((k, raw)) = raw
            && !ends_here
        {
            let event = Event::Logprobs(token_logprobs(&self.tokenizer, &raw, token, k));
            if !send(seq, event) {
                return Outcome::Finished;
            }
        }
        if ends_here {
            let rest = seq.decoder.finish(&self.tokenizer) + &seq.stops.finish();
            if !rest.is_empty() && !send(seq, Event::Text(rest)) {
                return Outcome::Finished;
            }
            return Outcome::Done(FinishReason::Stop);
        }
        if let Some(c) = &mut seq.constraint
            && let Err(e) = c.commit(token)
        {
            let _ = seq.events.send(Event::Failed(Failure::Constraint(e)));
            return Outcome::Finished;
        }
        let piece = seq.decoder.push(&self.tokenizer, token);
        if let Some(r) = &mut seq.reasoning {
            r.push(&piece);
        }
        match seq.stops.push(&piece) {
            StopOutcome::Continue(text) => {
                if !text.is_empty() && !send(seq, Event::Text(text)) {
                    return Outcome::Finished;
                }
            }
            StopOutcome::Stopped(text, index) => {
                if !text.is_empty() && !send(seq, Event::Text(text)) {
                    return Outcome::Finished;
                }
                return Outcome::Done(FinishReason::StopSequence(index));
            }
        }
        // A complete grammar allows only the end: finish now rather than spend a step on it.
        let complete = seq
            .constraint
            .as_ref()
            .is_some_and(TokenConstraint::is_finished);
        if complete || seq.generated >= seq.max_new {
            let rest = seq.decoder.finish(&self.tokenizer);
            let rest = match seq.stops.push(&rest) {
                StopOutcome::Continue(t) => t + &seq.stops.finish(),
                StopOutcome::Stopped(t, index) => {
                    if !t.is_empty() && !send(seq, Event::Text(t)) {
                        return Outcome::Finished;
                    }
                    return Outcome::Done(FinishReason::StopSequence(index));
                }
            };
            if !rest.is_empty() && !send(seq, Event::Text(rest)) {
                return Outcome::Finished;
            }
            // At the token limit the answer is cut ("length"), as llama.cpp reports it, even
            // when that last token also completed the grammar.
            let reason = if seq.generated >= seq.max_new {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            return Outcome::Done(reason);
        }
        Outcome::Continue
    }
}
