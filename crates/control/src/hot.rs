//! The control plane's fast path, for a process that admits thousands of requests a second
//! (the router): a short-lived cache of authenticated keys, budget leases, and a writer
//! thread that commits settlements in groups off the request's path.
//!
//! - **Key cache.** A key read from the store is kept for a configured time. Each use still
//!   checks the presented secret against the stored hash, the revocation mark and the expiry
//!   date; an admin change made through this process empties the cache at once, one made by
//!   another process is seen within the time configured.
//! - **Budget leases.** Instead of one store transaction per request, the process reserves a
//!   slice of a key's budget in the store at a time (the lease) and hands requests their
//!   tokens from it in memory; unused tokens of a settled request go back to the lease, and a
//!   lease left idle is given back to the store. The store's count always covers every token
//!   handed out, so a budget is never overspent, across processes included; what a lease
//!   holds is only unavailable to the other processes for a while.
//! - **Group commit.** Settlements (budget, usage record, audit entry) go to one writer
//!   thread, which commits whatever has queued up in one transaction. The chain of the audit
//!   log is sealed in queue order. A store outage delays the records (the writer retries),
//!   it does not lose them, unless the process dies meanwhile. A front that must not answer
//!   before its record is in the store (the router) waits for its group's commit
//!   ([`Writer::committed`]): the transaction is still shared, and while the store is down
//!   nobody waits.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::audit::AuditDraft;
use crate::error::StoreError;
use crate::store::{Mutation, Store};
use crate::time::Clock;
use crate::types::KeyContext;

/// Keys kept at most; beyond this the cache starts over (keys are read again).
const MAX_CACHED_KEYS: usize = 100_000;
/// Settlements committed in one transaction at most.
pub(crate) const MAX_GROUP: usize = 512;
/// How long the writer gathers settlements after the first before it commits them.
const GROUP_WINDOW: Duration = Duration::from_millis(10);
/// How often the writer wakes when nothing is queued, to give idle leases back.
const WRITER_TICK: Duration = Duration::from_millis(250);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent, so a poisoned lock is safe.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Authenticated keys, by key id.
#[derive(Debug)]
pub(crate) struct KeyCache {
    ttl: Duration,
    keys: Mutex<HashMap<String, (Arc<KeyContext>, Instant)>>,
}

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl,
            keys: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The key's context if it was read less than the configured time before `now`.
    pub(crate) fn get(&self, key_id: &str, now: Instant) -> Option<Arc<KeyContext>> {
        if !self.enabled() {
            return None;
        }
        let keys = lock(&self.keys);
        let (ctx, read_at) = keys.get(key_id)?;
        (now.saturating_duration_since(*read_at) < self.ttl).then(|| Arc::clone(ctx))
    }

    /// Keeps the key's context, read at `now`.
    pub(crate) fn put(&self, ctx: &KeyContext, now: Instant) {
        if !self.enabled() {
            return;
        }
        let mut keys = lock(&self.keys);
        if keys.len() >= MAX_CACHED_KEYS {
            keys.clear();
        }
        keys.insert(ctx.key.id.clone(), (Arc::new(ctx.clone()), now));
    }

    pub(crate) fn clear(&self) {
        lock(&self.keys).clear();
    }
}

/// A slice of one key's budget reserved in the store and not yet handed to a request.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) period_start_ms: i64,
    pub(crate) available: u64,
    pub(crate) last_used: Instant,
}

/// Budget leases, by key id.
#[derive(Debug)]
pub(crate) struct Leases {
    /// Tokens reserved ahead at a time (0: leases are off).
    pub(crate) chunk: u64,
    /// The process holding them in the store ([`crate::store::Holder::id`]).
    pub(crate) holder: String,
    keys: Mutex<HashMap<String, Arc<Mutex<Lease>>>>,
}

impl Leases {
    pub(crate) fn new(chunk: u64, holder: String) -> Self {
        Leases {
            chunk,
            holder,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets what every lease holds, without giving it back: for when the store has
    /// already released this process's holds (it was taken for dead). Reservations taken
    /// from the old leases then settle in the store, not back into a lease.
    pub(crate) fn forget_all(&self) {
        for lease in lock(&self.keys).values() {
            let mut lease = lock(lease);
            lease.available = 0;
            lease.period_start_ms = i64::MIN;
        }
    }

    /// The store update that returns `tokens` reserved in a period without using them.
    pub(crate) fn give_back(&self, key_id: &str, period_start_ms: i64, tokens: u64) -> Mutation {
        Mutation::SettleBudget {
            holder: self.holder.clone(),
            key_id: key_id.to_owned(),
            period_start_ms,
            reserved_tokens: i64::try_from(tokens).unwrap_or(i64::MAX),
            actual_tokens: 0,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.chunk > 0
    }

    /// The key's lease (empty when new, and last used `now`).
    pub(crate) fn of(&self, key_id: &str, period_start_ms: i64, now: Instant) -> Arc<Mutex<Lease>> {
        let mut keys = lock(&self.keys);
        Arc::clone(keys.entry(key_id.to_owned()).or_insert_with(|| {
            Arc::new(Mutex::new(Lease {
                period_start_ms,
                available: 0,
                last_used: now,
            }))
        }))
    }

    /// Empties the leases not used for `idle` before `now` (all of them when `idle` is zero)
    /// and returns the store updates that give their tokens back. A lease busy right now is
    /// left alone.
    pub(crate) fn take_idle(&self, idle: Duration, now: Instant) -> Vec<Mutation> {
        let keys = lock(&self.keys);
        let mut out = Vec::new();
        for (key_id, lease) in keys.iter() {
            let Ok(mut lease) = lease.try_lock() else {
                continue;
            };
            let unused_for = now.saturating_duration_since(lease.last_used);
            if lease.available > 0 && (idle.is_zero() || unused_for >= idle) {
                out.push(self.give_back(key_id, lease.period_start_ms, lease.available));
                lease.available = 0;
            }
        }
        out
    }
}

/// One settlement waiting for the writer.
pub(crate) type Pending = (Vec<Mutation>, Option<AuditDraft>);

#[derive(Debug, Default)]
struct Progress {
    queued: u64,
    done: u64,
}

/// What the writer thread has done, for those waiting on it without a thread of their own:
/// settlements committed (or dropped) in queue order, and whether its last commit failed
/// because the store is down.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    done: u64,
    store_down: bool,
}

/// The writer thread's end of things: started on first use.
pub(crate) struct Writer {
    written: Arc<tokio::sync::watch::Sender<Written>>,
    store: Arc<dyn Store>,
    leases: Arc<Leases>,
    /// Tells the thread when a lease has been idle long enough to go back.
    pub(crate) clock: Arc<dyn Clock>,
    sender: Mutex<Option<mpsc::Sender<Pending>>>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    max_waiting: usize,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        leases: Arc<Leases>,
        clock: Arc<dyn Clock>,
        max_waiting: usize,
    ) -> Self {
        Writer {
            written: Arc::new(tokio::sync::watch::Sender::new(Written::default())),
            store,
            leases,
            clock,
            sender: Mutex::new(None),
            progress: Arc::new((Mutex::new(Progress::default()), Condvar::new())),
            max_waiting,
        }
    }

    /// Settlements queued and not yet committed.
    pub(crate) fn waiting(&self) -> u64 {
        let p = lock(&self.progress.0);
        p.queued - p.done
    }

    /// Queues a settlement; false (and nothing queued) when too many already wait.
    pub(crate) fn push(&self, pending: Pending) -> bool {
        self.push_numbered(pending).is_some()
    }

    /// Queues a settlement and returns its place in the queue (for [`Writer::committed`]);
    /// `None` (and nothing queued) when too many already wait.
    pub(crate) fn push_numbered(&self, pending: Pending) -> Option<u64> {
        let number = {
            let mut p = lock(&self.progress.0);
            if p.queued - p.done >= self.max_waiting as u64 {
                return None;
            }
            p.queued += 1;
            p.queued
        };
        let mut sender = lock(&self.sender);
        let tx = sender.get_or_insert_with(|| self.start());
        if let Err(mpsc::SendError(pending)) = tx.send(pending) {
            // The thread is gone (it cannot end while a sender lives, unless it panicked):
            // start another and hand it the settlement.
            let tx = self.start();
            let sent = tx.send(pending).is_ok();
            *sender = Some(tx);
            if !sent {
                let mut p = lock(&self.progress.0);
                p.queued -= 1;
                return None;
            }
        }
        Some(number)
    }

    /// Waits until the settlement queued as `number` is committed: true then; false at once
    /// when the store is (or goes) down, or when `timeout` passes first (the settlement stays
    /// queued either way).
    pub(crate) async fn committed(&self, number: u64, timeout: Duration) -> bool {
        let mut rx = self.written.subscribe();
        let wait = rx.wait_for(|w| w.done >= number || w.store_down);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(w)) => w.done >= number,
            _ => false,
        }
    }

    fn start(&self) -> mpsc::Sender<Pending> {
        let (tx, rx) = mpsc::channel();
        let store = Arc::clone(&self.store);
        let leases = Arc::clone(&self.leases);
        let clock = Arc::clone(&self.clock);
        let progress = Arc::clone(&self.progress);
        let written = Arc::clone(&self.written);
        let spawned = std::thread::Builder::new()
            .name("control-writer".to_owned())
            .spawn(move || write_loop(&*store, &leases, &*clock, &rx, (&progress, &written)));
        if let Err(err) = spawned {
            tracing::error!(error = %err, "could not start the control plane's writer thread");
        }
        tx
    }

    /// Waits until every settlement queued before the call is committed, or `timeout`
    /// passes; true when they are.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.progress;
        let mut p = lock(m);
        let target = p.queued;
        while p.done < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            p = match cv.wait_timeout(p, deadline - now) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// Idle time after which a lease goes back to the store.
pub(crate) const LEASE_IDLE: Duration = Duration::from_secs(1);

fn write_loop(
    store: &dyn Store,
    leases: &Leases,
    clock: &dyn Clock,
    rx: &mpsc::Receiver<Pending>,
    (progress, written): (
        &(Mutex<Progress>, Condvar),
        &tokio::sync::watch::Sender<Written>,
    ),
) {
    let mut backoff = Duration::from_millis(50);
    // A group the store could not take yet, and how many queued settlements it holds.
    let mut batch: Vec<Pending> = Vec::new();
    let mut n: u64 = 0;
    let mut closed = false;
    loop {
        if batch.is_empty() && !closed {
            match rx.recv_timeout(WRITER_TICK) {
                Ok(first) => {
                    batch.push(first);
                    n += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        // Gather what else arrives within the window: one transaction for many settlements
        // costs the store (and the CPU the requests share) much less than one each.
        let deadline = Instant::now() + GROUP_WINDOW;
        while !closed && batch.len() < MAX_GROUP {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(next) => {
                    batch.push(next);
                    n += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        // Once no sender is left the process is ending: every lease goes back.
        let idle = if closed { Duration::ZERO } else { LEASE_IDLE };
        let returns = leases.take_idle(idle, clock.instant());
        if !returns.is_empty() {
            batch.push((returns, None));
        }
        if !batch.is_empty() {
            if let Err(err) = commit_group(store, &mut batch) {
                // The store is down: keep what is left and try again, later each time.
                tracing::warn!(error = %err, waiting = batch.len(), "settlements wait for the store");
                written.send_modify(|w| w.store_down = true);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            backoff = Duration::from_millis(50);
            if written.borrow().store_down {
                written.send_modify(|w| w.store_down = false);
            }
        }
        if n > 0 {
            let (m, cv) = progress;
            let done = {
                let mut p = lock(m);
                p.done += n;
                p.done
            };
            cv.notify_all();
            written.send_replace(Written {
                done,
                store_down: false,
            });
            n = 0;
        }
        if closed {
            return;
        }
    }
}

/// Commits a group in one transaction; if the store refuses it for a reason other than
/// being down, commits the settlements one by one so that one bad record does not hold back
/// the others (the bad one is logged and dropped). What was committed (or dropped) leaves
/// `batch`; `Err` only when the store is down.
pub(crate) fn commit_group(store: &dyn Store, batch: &mut Vec<Pending>) -> Result<(), StoreError> {
    match store.commit_batch(batch) {
        Ok(()) => {
            batch.clear();
            Ok(())
        }
        Err(err @ StoreError::Unavailable { .. }) => Err(err),
        Err(err) => {
            tracing::warn!(error = %err, "a group of settlements was refused; committing one by one");
            while let Some((mutations, draft)) = batch.first() {
                match store.commit(mutations, draft.as_ref()) {
                    Ok(_) => {}
                    Err(err @ StoreError::Unavailable { .. }) => return Err(err),
                    Err(err) => {
                        tracing::error!(error = %err, "a settlement was refused by the store and dropped");
                    }
                }
                batch.remove(0);
            }
            Ok(())
        }
    }
}
