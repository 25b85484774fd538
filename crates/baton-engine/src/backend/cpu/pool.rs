//! The CPU backend's threads: one parallel loop at a time, its tasks claimed one by one from a
//! shared counter by the calling thread and the pool's workers alike.
//!
//! Nothing is assigned to a thread in advance, so a thread the operating system takes away for
//! a while delays at most the one task it holds while the others take the rest. Idle workers
//! spin for a short while (a decode step meets them ~150 times, tens of microseconds apart), then
//! yield, then sleep until the next loop wakes them.

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// An idle worker spins this long before yielding its CPU between checks.
const SPIN: Duration = Duration::from_micros(30);
/// ... and yields this long before it sleeps.
const YIELD: Duration = Duration::from_micros(500);
/// Tasks per loop the packed state can count.
pub const MAX_TASKS: usize = (1 << 24) - 1;

/// The loop being run: its epoch, task count and next unclaimed task in one word, so that a
/// claim (a compare-and-swap of that word) can only succeed against the loop it read.
fn pack(epoch: u64, total: usize, next: usize) -> u64 {
    (epoch << 48) | ((total as u64) << 24) | next as u64
}
fn epoch_of(s: u64) -> u64 {
    s >> 48
}
fn total_of(s: u64) -> usize {
    ((s >> 24) & 0xFF_FFFF) as usize
}
fn next_of(s: u64) -> usize {
    (s & 0xFF_FFFF) as usize
}

/// The caller's closure, on the caller's stack for the length of one loop.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    state: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    finished: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
}

struct Worker {
    thread: Thread,
    sleeping: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

thread_local! {
    /// Set while this thread runs a task, so a loop started inside a task runs inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// `threads` threads in all: the caller and `threads - 1` workers.
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    /// One loop at a time; a second caller waits its turn.
    caller: Mutex<()>,
}

impl WorkerPool {
    pub fn new(threads: usize) -> std::io::Result<WorkerPool> {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(pack(0, 0, 0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            finished: AtomicUsize::new(0),
            panic: Mutex::new(None),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let sleeping = Arc::new(AtomicBool::new(false));
            let (s, z) = (shared.clone(), sleeping.clone());
            let handle = thread::Builder::new().name(format!("baton-cpu-{i}")).spawn(move || worker_loop(&s, &z))?;
            workers.push(Worker { thread: handle.thread().clone(), sleeping, handle: Some(handle) });
        }
        Ok(WorkerPool { shared, workers, caller: Mutex::new(()) })
    }

    /// Threads that run a loop, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0)`, ..., `f(tasks - 1)` across the pool and returns when all have run. A panic
    /// in a task is raised here once every task has finished.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 || self.workers.is_empty() || tasks > MAX_TASKS || IN_TASK.get() {
            (0..tasks).for_each(f);
            return;
        }
        let _turn = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { f };
        let sh = &*self.shared;
        sh.finished.store(0, Ordering::Relaxed);
        // SAFETY (lifetime): workers call `job.f` only after claiming a task of this loop, and
        // this function returns only after every claimed task has finished.
        sh.job.store(&job as *const Job<'_> as *mut Job<'static>, Ordering::Release);
        let epoch = (epoch_of(sh.state.load(Ordering::Relaxed)) + 1) & 0xFFFF;
        sh.state.store(pack(epoch, tasks, 0), Ordering::SeqCst);
        for w in &self.workers {
            if w.sleeping.swap(false, Ordering::SeqCst) {
                w.thread.unpark();
            }
        }
        run_tasks(sh, epoch);
        let start = Instant::now();
        while sh.finished.load(Ordering::Acquire) < tasks {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        if let Some(p) = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for w in &mut self.workers {
            w.thread.unpark();
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Claims and runs tasks of loop `epoch` until none is left.
fn run_tasks(sh: &Shared, epoch: u64) {
    loop {
        let s = sh.state.load(Ordering::Acquire);
        if epoch_of(s) != epoch || next_of(s) >= total_of(s) {
            return;
        }
        if sh.state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            continue;
        }
        // The loop cannot end (nor the job pointer change) before this claimed task finishes.
        let job = sh.job.load(Ordering::Acquire);
        IN_TASK.set(true);
        // SAFETY: see `for_each`; the pointer is this loop's job, alive until `finished` counts us.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { ((*job).f)(next_of(s)) }));
        IN_TASK.set(false);
        if let Err(p) = outcome {
            sh.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
        sh.finished.fetch_add(1, Ordering::Release);
    }
}

fn worker_loop(sh: &Shared, sleeping: &AtomicBool) {
    let mut seen = epoch_of(sh.state.load(Ordering::Acquire));
    loop {
        let mut idle_since = Instant::now();
        let mut checks = 0u32;
        loop {
            if sh.shutdown.load(Ordering::Relaxed) {
                return;
            }
            let s = sh.state.load(Ordering::Acquire);
            if epoch_of(s) != seen {
                seen = epoch_of(s);
                break;
            }
            checks = checks.wrapping_add(1);
            let idle = if checks % 32 == 0 { idle_since.elapsed() } else { Duration::ZERO };
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < YIELD {
                thread::yield_now();
            } else {
                sleeping.store(true, Ordering::SeqCst);
                if epoch_of(sh.state.load(Ordering::SeqCst)) == seen && !sh.shutdown.load(Ordering::SeqCst) {
                    thread::park();
                }
                sleeping.store(false, Ordering::SeqCst);
                idle_since = Instant::now();
            }
        }
        run_tasks(sh, seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_per_loop() {
        for threads in [1, 2, 3, 5] {
            let pool = WorkerPool::new(threads).unwrap();
            for tasks in [0, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                pool.for_each(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{threads} threads, {tasks} tasks");
            }
        }
    }

    #[test]
    fn back_to_back_loops_see_their_own_closures() {
        let pool = WorkerPool::new(3).unwrap();
        let sum = AtomicUsize::new(0);
        for round in 0..20_000usize {
            let add = round % 7;
            pool.for_each(3, &|_| {
                sum.fetch_add(add, Ordering::Relaxed);
            });
        }
        let want: usize = (0..20_000usize).map(|r| 3 * (r % 7)).sum();
        assert_eq!(sum.load(Ordering::Relaxed), want);
    }

    #[test]
    fn a_sleeping_worker_wakes_for_the_next_loop() {
        let pool = WorkerPool::new(2).unwrap();
        let on_worker = AtomicBool::new(false);
        let caller = thread::current().id();
        // Let the worker go to sleep, then give it tasks long enough that it must take one.
        thread::sleep(YIELD * 4);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !on_worker.load(Ordering::Relaxed) && Instant::now() < deadline {
            pool.for_each(4, &|_| {
                if thread::current().id() != caller {
                    on_worker.store(true, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(1));
            });
        }
        assert!(on_worker.load(Ordering::Relaxed), "the worker never took a task");
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_pool_goes_on() {
        let pool = WorkerPool::new(2).unwrap();
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.for_each(16, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 5, "task five fails");
            })
        }));
        assert!(result.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 16, "every task still ran");
        let again = AtomicUsize::new(0);
        pool.for_each(8, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn a_loop_inside_a_task_runs_inline() {
        let pool = WorkerPool::new(2).unwrap();
        let n = AtomicUsize::new(0);
        pool.for_each(4, &|_| {
            pool.for_each(3, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(n.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn the_packed_state_round_trips() {
        let s = pack(0xFFFF, MAX_TASKS, 12345);
        assert_eq!((epoch_of(s), total_of(s), next_of(s)), (0xFFFF, MAX_TASKS, 12345));
    }
}
