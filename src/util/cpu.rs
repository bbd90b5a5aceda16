//! Pinning a thread to one CPU (`sched_setaffinity(2)`): event-loop threads, sandboxed
//! instances and VM processes each run on the core that serves them (or, for an
//! instance placed beside its worker, on the next core's and that one's:
//! `sandbox::InstanceCpus`).

use std::io;

/// Pins thread `tid` (0: the calling thread) to CPU `core`.
///
/// Async-signal-safe (no allocation, one system call), so it may run between `fork` and
/// `exec`. A `core` beyond what a `cpu_set_t` holds is `EINVAL`.
pub fn pin_thread(tid: libc::pid_t, core: usize) -> io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data, valid when zeroed; `core` is within its bits (checked
    // above); sched_setaffinity reads the set and nothing else.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the calling thread's scheduling policy: `SCHED_BATCH` when `batch`,
/// else `SCHED_OTHER` (both at nice 0's weight; a batch thread differs only
/// in that its wake-ups never preempt the thread running on its CPU).
/// Threads and processes it creates afterwards inherit the policy.
pub fn set_batch(batch: bool) -> io::Result<()> {
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_switches_to_batch_and_back() {
        std::thread::spawn(|| {
            fn policy() -> i32 {
                // SAFETY: plain syscall about the calling thread.
                unsafe { libc::sched_getscheduler(0) }
            }
            set_batch(true).unwrap();
            assert_eq!(policy(), libc::SCHED_BATCH);
            // What it spawns inherits it (the starter threads reset it).
            assert_eq!(
                std::thread::spawn(policy).join().unwrap(),
                libc::SCHED_BATCH
            );
            set_batch(false).unwrap();
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    /// The CPUs the calling thread may run on.
    fn allowed_cpus() -> Vec<usize> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        }
    }

    #[test]
    fn pins_the_calling_thread_to_one_cpu() {
        // A thread of its own, so the test runner's threads keep their affinity.
        std::thread::spawn(|| {
            let allowed = allowed_cpus();
            let last = *allowed.last().expect("at least one CPU is allowed");
            pin_thread(0, last).unwrap();
            assert_eq!(allowed_cpus(), vec![last]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_cpu_beyond_the_set_is_invalid() {
        let e = pin_thread(0, libc::CPU_SETSIZE as usize).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
