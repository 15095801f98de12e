//! A persistent thread pool with a cheap fork-join `parallel_for`.
//!
//! Workers are created once. A call publishes a job (which lives on the caller's stack) by
//! bumping the epoch in one atomic `state` word; each worker that sees the new epoch *joins*
//! the job (a compare-and-swap on `state` that fails once the job is closed), takes task
//! indices from the job's shared counter until none are left, and checks out. When the
//! caller has run out of tasks it *closes* the job (sets a bit in `state`, reading how many
//! workers joined) and waits only for those. A worker that was descheduled, parked or slow to
//! notice never joins and is not waited for: on a machine shared with other processes the
//! caller does the remaining work itself instead of stalling for a scheduler time slice,
//! which with ~200 calls per generated token is the difference between full speed and a
//! fraction of it.
//!
//! Idle workers spin on `state` for a while (about 100 µs) before parking on a condvar, so
//! back-to-back calls hand off in well under a microsecond while an idle pool burns no CPU.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Spin iterations (each a `spin_loop` hint, ~25 ns) before a waiting thread parks.
const SPIN_LIMIT: u32 = 4_000;

/// `state` layout: epoch in the high 32 bits; the low 32 bits hold the `CLOSED` flag and the
/// number of workers that joined the current job.
const CLOSED: u64 = 1 << 31;
const JOINED_MASK: u64 = CLOSED - 1;

fn epoch_of(state: u64) -> u64 {
    state >> 32
}

thread_local! {
    /// True while this thread runs tasks of some pool; a nested `parallel_for` then runs
    /// inline instead of waiting on workers that may be busy with the outer call.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

type TaskFn = dyn Fn(usize) + Sync;

/// One `parallel_for` call. Lives on the caller's stack for the duration of the call.
struct Job {
    /// The caller's closure with its lifetime erased; see `parallel_for` for why it stays
    /// valid for as long as anyone can reach it.
    f: *const TaskFn,
    n_tasks: usize,
    next: AtomicUsize,
    /// Joined workers that have checked out.
    finished: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job {
    /// Claims and runs tasks until none are left. A panicking task is caught, recorded
    /// (first one wins) and stops further hand-outs.
    fn run_tasks(&self) {
        // SAFETY: `f` points to the closure borrowed by the `parallel_for` call that owns
        // this job; that call does not return before every thread that joined the job has
        // checked out (see `parallel_for`), so the closure is alive here.
        let f = unsafe { &*self.f };
        let was_in_pool = IN_POOL.replace(true);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                break;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                let mut slot = lock(&self.panic);
                if slot.is_none() {
                    *slot = Some(payload);
                }
                self.next.store(self.n_tasks, Ordering::Relaxed);
            }
        }
        IN_POOL.set(was_in_pool);
    }
}

struct Shared {
    /// Epoch (bumped once per published job and at shutdown), `CLOSED`, joined count.
    state: AtomicU64,
    /// The current job; only dereferenced by a worker that joined it, before it checks out.
    job: AtomicPtr<Job>,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    /// The caller is parked (or about to park) on `done`.
    caller_waiting: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    /// Workers wait here for a new epoch.
    wake: Condvar,
    /// The caller waits here for the last joined worker to check out.
    done: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The pool's mutexes guard no invariants that a panic could break (`()` or an
    // `Option` slot), so a poisoned lock is simply taken over.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fixed set of worker threads for data-parallel loops. `Send + Sync`; dropping it joins
/// the workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises concurrent `parallel_for` calls from different threads.
    submit: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .finish()
    }
}

impl ThreadPool {
    /// A pool in which `n_threads` threads (the caller of `parallel_for` included) share the
    /// work: `n_threads - 1` workers are spawned. `0` is treated as `1`. If the OS refuses
    /// to spawn a thread, the pool runs with the workers it got.
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            // Epoch 0, closed: nothing to join until the first job.
            state: AtomicU64::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            caller_waiting: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 1..n_threads.max(1) {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("souverain-kernels-{i}"))
                .spawn(move || worker_main(&s))
            {
                Ok(h) => workers.push(h),
                Err(_) => break,
            }
        }
        Self {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// Number of threads that run tasks (workers plus the calling thread).
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0)`, …, `f(n_tasks - 1)` across the pool and the calling thread, returning
    /// when all have finished. Tasks are handed out dynamically, in no particular order.
    ///
    /// A call made from inside a task (of any pool) runs its tasks inline on that thread.
    ///
    /// # Panics
    ///
    /// If a task panics, the remaining unclaimed tasks are skipped and the first panic is
    /// re-raised here once every thread has stopped using `f`.
    pub fn parallel_for(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 || IN_POOL.get() {
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        let _submit = lock(&self.submit);
        // SAFETY: only the lifetime of the trait object is erased (same layout). The
        // erased pointer is reachable only through `job`, which lives on this stack
        // frame; a worker dereferences it only after joining this job (a CAS on `state`
        // that succeeds only before the job is closed) and before checking out, and this
        // function does not return (normally or by unwinding: task panics are caught in
        // `run_tasks` and re-raised below, after the wait) until it has closed the job and
        // every worker that joined has checked out. The caller's borrow of `f` outlives
        // this call, so `f` is valid for every use.
        let f_static: *const TaskFn =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const TaskFn>(f) };
        let job = Job {
            f: f_static,
            n_tasks,
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        let shared = &*self.shared;
        shared
            .job
            .store(std::ptr::from_ref(&job).cast_mut(), Ordering::Release);
        // Only this thread (holding `submit`) changes the epoch, and the previous job is
        // closed, so no worker can change `state` between this load and store.
        let epoch = epoch_of(shared.state.load(Ordering::SeqCst)).wrapping_add(1) & 0xFFFF_FFFF;
        shared.state.store(epoch << 32, Ordering::SeqCst);
        // Dekker-style with the worker's `sleepers += 1; check epoch` (both SeqCst): either
        // the worker sees the new epoch, or we see it as a sleeper and notify under the lock.
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&shared.lock);
            shared.wake.notify_all();
        }

        job.run_tasks();

        // No task is left to claim: close the job to latecomers and wait for the joined.
        let joined = (shared.state.fetch_or(CLOSED, Ordering::SeqCst) & JOINED_MASK) as usize;
        let mut spins = 0;
        while job.finished.load(Ordering::Acquire) != joined {
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
                spins += 1;
            } else {
                // Dekker-style with the worker's `finished += 1; check caller_waiting`.
                shared.caller_waiting.store(true, Ordering::SeqCst);
                let mut g = lock(&shared.lock);
                while job.finished.load(Ordering::SeqCst) != joined {
                    g = shared.done.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
                shared.caller_waiting.store(false, Ordering::SeqCst);
                break;
            }
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let panic = job
            .panic
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // `&mut self`: no `parallel_for` is running, so the current job is closed.
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let epoch = epoch_of(self.shared.state.load(Ordering::SeqCst)).wrapping_add(1);
        self.shared
            .state
            .store(((epoch & 0xFFFF_FFFF) << 32) | CLOSED, Ordering::SeqCst);
        {
            let _g = lock(&self.shared.lock);
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            // A worker never panics (tasks are caught), so a join error cannot carry
            // anything worth re-raising during drop.
            let _ = h.join();
        }
    }
}

fn worker_main(shared: &Shared) {
    let mut seen = epoch_of(shared.state.load(Ordering::SeqCst));
    loop {
        let mut spins = 0;
        loop {
            // A worker that starts after `Drop` moved to the shutdown epoch would otherwise
            // wait for an epoch change that never comes.
            if shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            let e = epoch_of(shared.state.load(Ordering::Acquire));
            if e != seen {
                seen = e;
                break;
            }
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
                spins += 1;
                continue;
            }
            let mut g = lock(&shared.lock);
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while epoch_of(shared.state.load(Ordering::SeqCst)) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                g = shared.wake.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Join the job of epoch `seen`, unless it is already closed or superseded.
        let mut s = shared.state.load(Ordering::SeqCst);
        let joined = loop {
            if epoch_of(s) != seen || s & CLOSED != 0 {
                break false;
            }
            match shared
                .state
                .compare_exchange_weak(s, s + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break true,
                Err(now) => s = now,
            }
        };
        if !joined {
            continue;
        }
        let job_ptr = shared.job.load(Ordering::Acquire);
        // SAFETY: the join succeeded on epoch `seen` before the job was closed, so the
        // `parallel_for` call that published `job_ptr` (Release store before its SeqCst
        // epoch store, which our SeqCst CAS read) counts this worker and will not return
        // before the check-out below; the epoch cannot advance while that call runs, so
        // `job_ptr` is this epoch's job and alive until then.
        let job = unsafe { &*job_ptr };
        job.run_tasks();
        // Check out. After this increment the job may be freed at any moment: touch it no
        // more. The Release half publishes this worker's task writes to the caller.
        job.finished.fetch_add(1, Ordering::SeqCst);
        if shared.caller_waiting.load(Ordering::SeqCst) {
            let _g = lock(&shared.lock);
            shared.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn pool_is_send_sync() {
        assert_send_sync::<ThreadPool>();
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for n_threads in [1, 2, 4] {
            let pool = ThreadPool::new(n_threads);
            assert_eq!(pool.n_threads(), n_threads);
            for n_tasks in [0, 1, 2, 3, 7, 64, 1000] {
                let hits: Vec<AtomicU64> = (0..n_tasks).map(|_| AtomicU64::new(0)).collect();
                pool.parallel_for(n_tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn many_back_to_back_calls() {
        let pool = ThreadPool::new(3);
        let total = AtomicU64::new(0);
        for round in 0..2000u64 {
            pool.parallel_for(5, &|i| {
                total.fetch_add(round * 5 + i as u64, Ordering::Relaxed);
            });
        }
        let n = 2000u64 * 5;
        assert_eq!(total.load(Ordering::Relaxed), n * (n - 1) / 2);
    }

    #[test]
    fn panic_in_task_reaches_caller_and_pool_survives() {
        let pool = ThreadPool::new(4);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.parallel_for(100, &|i| {
                if i == 37 {
                    panic!("task 37 failed");
                }
            });
        }));
        let payload = r.expect_err("the task panic must propagate");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 37 failed"));
        let count = AtomicU64::new(0);
        pool.parallel_for(50, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 50);
    }

    #[test]
    fn nested_call_runs_inline() {
        let pool = ThreadPool::new(2);
        let count = AtomicU64::new(0);
        pool.parallel_for(4, &|_| {
            pool.parallel_for(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_callers_share_one_pool() {
        let pool = ThreadPool::new(3);
        let count = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.parallel_for(4, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 3 * 200 * 4);
    }
}
