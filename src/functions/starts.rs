//! Instance starts off the event loops: a queue of start jobs that starter
//! threads run, fair between functions.
//!
//! A start lasts as long as its guest takes to initialise, which the function
//! controls: an init that hangs holds its start until the backend's deadline.
//! So one function runs at most [`STARTS_PER_FUNCTION_MAX`] starts at once
//! (its others wait in the queue, holding no thread), and while every thread
//! is busy a start of another function gets a new thread (up to
//! [`STARTER_THREADS_MAX`]): no function's cold start waits behind another's
//! hanging ones.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::Function;
use crate::sandbox::InstanceCpus;

/// Starter threads kept while there is nothing to start.
pub const STARTER_THREADS: usize = 4;
/// Most starter threads at once: the kept ones and those made while every
/// thread was busy (they end when they find nothing to run).
pub const STARTER_THREADS_MAX: usize = 64;
/// Most starts of one function running at once; its other starts wait. As
/// many as the kept threads, so a burst of one function starts as fast as it
/// did when those threads were all there was (a cap of 2 halved that).
pub const STARTS_PER_FUNCTION_MAX: usize = STARTER_THREADS;

/// An instance start a core asked for.
pub struct StartJob {
    /// The core that asked, which the instance is handed to.
    pub core: usize,
    /// The CPUs the instance runs on.
    pub cpus: InstanceCpus,
    pub function: Arc<Function>,
}

/// Runs one start and hands its outcome to the core that asked.
pub type RunStart = Box<dyn Fn(StartJob) + Send + Sync>;

/// The start queue and its threads; see the module documentation.
pub struct Starts {
    queue: Mutex<Queue>,
    /// Wakes an idle thread (one per [`Queue::wakes`]).
    wake: Condvar,
    /// Set once, by [`Starts::start_threads`].
    run: OnceLock<RunStart>,
}

#[derive(Default)]
struct Queue {
    /// Starts not running yet, oldest first.
    waiting: VecDeque<StartJob>,
    /// Starts running, per function id.
    running: HashMap<String, usize>,
    /// Threads alive.
    threads: usize,
    /// Threads waiting for work and not yet woken.
    idle: usize,
    /// Wake-ups given and not yet taken by a thread.
    wakes: usize,
}

impl Queue {
    fn may_run(&self, id: &str) -> bool {
        self.running.get(id).copied().unwrap_or(0) < STARTS_PER_FUNCTION_MAX
    }

    /// The oldest waiting start whose function may run another, counted as running.
    fn take(&mut self) -> Option<StartJob> {
        let at = self
            .waiting
            .iter()
            .position(|j| self.may_run(&j.function.spec.id))?;
        let job = self.waiting.remove(at).expect("position is in range");
        *self
            .running
            .entry(job.function.spec.id.clone())
            .or_default() += 1;
        Some(job)
    }

    fn finished(&mut self, id: &str) {
        let n = self.running.get_mut(id).expect("a running start");
        *n -= 1;
        if *n == 0 {
            self.running.remove(id);
        }
    }

    fn any_runnable(&self) -> bool {
        self.waiting
            .iter()
            .any(|j| self.may_run(&j.function.spec.id))
    }
}

impl Starts {
    pub fn new() -> Arc<Starts> {
        Arc::new(Starts {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            run: OnceLock::new(),
        })
    }

    /// Starts the kept threads, which run each start with `run`.
    pub fn start_threads(self: &Arc<Self>, run: RunStart) {
        assert!(self.run.set(run).is_ok(), "starter threads started twice");
        for _ in 0..STARTER_THREADS {
            self.queue.lock().unwrap().threads += 1;
            self.spawn_thread();
        }
    }

    /// Queues a start; it runs once its function runs fewer than
    /// [`STARTS_PER_FUNCTION_MAX`] and a thread is free or can be made.
    pub fn push(self: &Arc<Self>, job: StartJob) {
        let mut q = self.queue.lock().unwrap();
        let runnable = q.may_run(&job.function.spec.id);
        q.waiting.push_back(job);
        if runnable {
            self.find_thread(q);
        }
    }

    /// Gives a runnable start a thread: wakes an idle one, else makes one.
    fn find_thread(self: &Arc<Self>, mut q: MutexGuard<'_, Queue>) {
        if q.idle > 0 {
            q.idle -= 1;
            q.wakes += 1;
            self.wake.notify_one();
        } else if q.threads < STARTER_THREADS_MAX && self.run.get().is_some() {
            q.threads += 1;
            drop(q);
            self.spawn_thread();
        }
    }

    /// Starts a thread the caller has counted in [`Queue::threads`].
    fn spawn_thread(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hearth-start".into())
            .spawn(move || me.serve());
        if let Err(e) = spawned {
            self.queue.lock().unwrap().threads -= 1;
            eprintln!("hearth: cannot start a starter thread: {e}");
        }
    }

    /// Body of a starter thread: runs starts while any may run; a thread
    /// beyond the kept ones then ends, a kept one waits to be woken.
    fn serve(self: Arc<Self>) {
        // Spawned by a worker, it inherits the worker's SCHED_BATCH
        // (`--worker-policy`), and the instances it starts would inherit it
        // from here: they run with the default policy.
        if let Err(e) = crate::util::cpu::set_batch(false) {
            eprintln!("hearth: a starter thread could not reset its scheduling policy: {e}");
        }
        let run = self.run.get().expect("set before threads start");
        let mut q = self.queue.lock().unwrap();
        loop {
            if let Some(job) = q.take() {
                if q.any_runnable() && q.idle > 0 {
                    self.find_thread(q);
                } else {
                    drop(q);
                }
                let id = job.function.spec.id.clone();
                run(job);
                q = self.queue.lock().unwrap();
                q.finished(&id);
                continue;
            }
            if q.threads > STARTER_THREADS {
                q.threads -= 1;
                return;
            }
            q.idle += 1;
            while q.wakes == 0 {
                q = self.wake.wait(q).unwrap();
            }
            q.wakes -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::budget::Budget;
    use crate::spec::FunctionSpec;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::time::Duration;

    fn function(id: &str) -> Arc<Function> {
        let spec = FunctionSpec {
            id: id.to_string(),
            handler: "index.handler".into(),
            memory_mb: 128,
            timeout_ms: 1000,
            concurrency: 10,
            env: Vec::new(),
            created_ms: 0,
            code_bytes: 0,
            backend: "process".into(),
            name: None,
            service: Default::default(),
            runtime: Default::default(),
        };
        let memory = Budget::new("instance memory", "MiB", 1 << 20);
        Arc::new(Function::new(spec, PathBuf::from("/nonexistent"), memory))
    }

    #[test]
    fn a_function_runs_at_most_its_share_and_others_pass_its_waiting_starts() {
        let mut q = Queue::default();
        let (hung, other) = (function("hung"), function("other"));
        for _ in 0..STARTS_PER_FUNCTION_MAX + 3 {
            q.waiting.push_back(StartJob {
                core: 0,
                cpus: InstanceCpus::on(0),
                function: hung.clone(),
            });
        }
        q.waiting.push_back(StartJob {
            core: 0,
            cpus: InstanceCpus::on(0),
            function: other.clone(),
        });
        let id = |j: StartJob| j.function.spec.id.clone();
        let taken: Vec<String> = std::iter::from_fn(|| q.take()).map(id).collect();
        let mut expected = vec!["hung"; STARTS_PER_FUNCTION_MAX];
        expected.push("other");
        assert_eq!(taken, expected);
        assert!(!q.any_runnable());
        q.finished("hung");
        assert_eq!(q.take().map(id).as_deref(), Some("hung"));
        assert_eq!(q.waiting.len(), 2);
    }

    #[test]
    fn starts_that_never_end_do_not_keep_other_functions_waiting() {
        let starts = Starts::new();
        let (ran, seen) = mpsc::channel::<String>();
        let ran = Mutex::new(ran);
        starts.start_threads(Box::new(move |job: StartJob| {
            let id = job.function.spec.id.clone();
            ran.lock().unwrap().send(id.clone()).unwrap();
            if id.starts_with("hung") {
                // Until the test ends.
                std::thread::sleep(Duration::from_secs(3600));
            }
        }));
        // More hanging starts than kept threads, from several functions.
        for n in 0..STARTER_THREADS + 2 {
            let f = function(&format!("hung{}", n % 3));
            starts.push(StartJob {
                core: 0,
                cpus: InstanceCpus::on(0),
                function: f,
            });
        }
        starts.push(StartJob {
            core: 0,
            cpus: InstanceCpus::on(0),
            function: function("other"),
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let id = seen
                .recv_timeout(left)
                .expect("the other function's start ran");
            if id == "other" {
                break;
            }
        }
    }
}
