//! A persistent thread pool with a cheap fork-join `parallel_for`.
//!
//! Workers are created once. A call publishes a job (which lives on the caller's stack),
//! bumps an epoch counter, and every worker plus the caller take task indices from a shared
//! atomic counter until none are left. Each worker then checks in by decrementing the job's
//! `pending` count; the caller returns only when that count is zero, i.e. when no worker
//! will touch the job (or the closure inside it) again. Idle workers spin on the epoch for a
//! short while before parking on a condvar, so back-to-back calls (~200 per token) hand off
//! in well under a microsecond while an idle pool burns no CPU.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Spin iterations (each a `spin_loop` hint) before a waiting thread parks.
const SPIN_LIMIT: u32 = 4_000;

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
    /// Workers that have not yet checked in for this job.
    pending: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job {
    /// Claims and runs tasks until none are left. A panicking task is caught, recorded
    /// (first one wins) and stops further hand-outs.
    fn run_tasks(&self) {
        // SAFETY: `f` points to the closure borrowed by the `parallel_for` call that owns
        // this job; that call does not return before every thread running `run_tasks` for
        // this job has finished (see `parallel_for`), so the closure is alive here.
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
    /// Bumped once per published job (and once at shutdown).
    epoch: AtomicUsize,
    /// The current job; only dereferenced by a worker between seeing a new epoch and
    /// checking in.
    job: AtomicPtr<Job>,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    /// Workers wait here for a new epoch.
    wake: Condvar,
    /// The caller waits here for the last check-in.
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
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
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
        // frame; workers dereference it only between seeing the new epoch and their
        // `pending` check-in, and this function does not return (normally or by
        // unwinding: task panics are caught in `run_tasks` and re-raised below, after the
        // wait) until `pending` is zero, i.e. every worker has checked in. The caller's
        // borrow of `f` outlives this call, so `f` is valid for every use.
        let f_static: *const TaskFn =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const TaskFn>(f) };
        let job = Job {
            f: f_static,
            n_tasks,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(self.workers.len()),
            panic: Mutex::new(None),
        };
        let shared = &*self.shared;
        shared
            .job
            .store(std::ptr::from_ref(&job).cast_mut(), Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        // Dekker-style with the worker's `sleepers += 1; check epoch` (both SeqCst): either
        // the worker sees the new epoch, or we see it as a sleeper and notify under the lock.
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&shared.lock);
            shared.wake.notify_all();
        }

        job.run_tasks();

        let mut spins = 0;
        while job.pending.load(Ordering::Acquire) != 0 {
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
                spins += 1;
            } else {
                let mut g = lock(&shared.lock);
                while job.pending.load(Ordering::Acquire) != 0 {
                    g = shared.done.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
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
        // `&mut self`: no `parallel_for` is running, so no job is published.
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
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
    let mut seen = 0usize;
    loop {
        let mut spins = 0;
        loop {
            let e = shared.epoch.load(Ordering::Acquire);
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
            while shared.epoch.load(Ordering::SeqCst) == seen {
                g = shared.wake.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let job_ptr = shared.job.load(Ordering::Acquire);
        // SAFETY: a new epoch other than shutdown means `parallel_for` published `job_ptr`
        // (the Acquire load of `epoch` synchronises with its SeqCst increment after the
        // Release store of the pointer), and that call is blocked until this worker
        // decrements `pending` below, so the job is alive until then. The epoch cannot
        // advance again before this check-in, so `job_ptr` is this epoch's job.
        let job = unsafe { &*job_ptr };
        job.run_tasks();
        // Check in. After this decrement the job may be freed at any moment: touch it no
        // more. The Release half publishes this worker's task writes to the caller.
        if job.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
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
