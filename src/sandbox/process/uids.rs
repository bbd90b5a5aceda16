//! Host uids for sandboxes: each live sandbox holds one of its own.
//!
//! uid 0 inside a sandbox maps to one unprivileged host uid, and that uid is what separates
//! tenants on the host: signals, `/proc/<pid>` access, RLIMIT_NPROC. Two live sandboxes sharing
//! one could signal or inspect each other. So uids are leased from a fixed range, one per
//! sandbox, and come back only when the sandbox's processes are gone (the [`UidLease`] is
//! dropped after the sandbox is reaped). Allocation is next-fit from a rotating cursor, so a
//! released uid is reused as late as possible.

use std::sync::{Arc, Mutex};

/// A range of host uids handed out one per live sandbox.
pub struct UidPool {
    base: u32,
    state: Mutex<PoolState>,
}

struct PoolState {
    /// One bit per uid of the range; set = leased.
    used: Vec<u64>,
    span: u32,
    /// Where the next search starts.
    cursor: u32,
    leased: u32,
}

/// One uid of a [`UidPool`], returned to it on drop.
pub struct UidLease {
    pool: Arc<UidPool>,
    uid: u32,
}

/// Every uid of the range is held by a live sandbox.
#[derive(Debug, PartialEq, Eq)]
pub struct UidsExhausted {
    /// Size of the range.
    pub span: u32,
    /// First uid of the range.
    pub base: u32,
}

impl std::fmt::Display for UidsExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "all {} sandbox host uids ({}..{}) are held by live instances",
            self.span,
            self.base,
            u64::from(self.base) + u64::from(self.span)
        )
    }
}

impl std::error::Error for UidsExhausted {}

impl UidPool {
    /// A pool of `span` uids starting at `base` (which must not be 0), searching from `start`.
    pub fn new(base: u32, span: u32, start: u32) -> Arc<UidPool> {
        assert!(base > 0, "uid 0 is host root");
        assert!(span > 0, "an empty uid range");
        assert!(
            base.checked_add(span).is_some(),
            "uid range {base}+{span} overflows"
        );
        Arc::new(UidPool {
            base,
            state: Mutex::new(PoolState {
                used: vec![0; span.div_ceil(64) as usize],
                span,
                cursor: start % span,
                leased: 0,
            }),
        })
    }

    /// Leases the next free uid.
    pub fn lease(self: &Arc<Self>) -> Result<UidLease, UidsExhausted> {
        let mut s = self.state.lock().unwrap();
        if s.leased == s.span {
            return Err(UidsExhausted {
                span: s.span,
                base: self.base,
            });
        }
        let mut i = s.cursor;
        loop {
            let (word, bit) = ((i / 64) as usize, i % 64);
            if s.used[word] & (1 << bit) == 0 {
                s.used[word] |= 1 << bit;
                s.leased += 1;
                s.cursor = (i + 1) % s.span;
                return Ok(UidLease {
                    pool: self.clone(),
                    uid: self.base + i,
                });
            }
            i = (i + 1) % s.span;
            assert_ne!(i, s.cursor, "a free uid was counted but not found");
        }
    }

    /// How many uids are leased now.
    pub fn leased(&self) -> u32 {
        self.state.lock().unwrap().leased
    }

    fn release(&self, uid: u32) {
        let i = uid - self.base;
        let mut s = self.state.lock().unwrap();
        let (word, bit) = ((i / 64) as usize, i % 64);
        assert!(s.used[word] & (1 << bit) != 0, "uid {uid} released twice");
        s.used[word] &= !(1 << bit);
        s.leased -= 1;
    }
}

impl UidLease {
    /// The host uid (and gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool.release(self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn live_leases_never_share_a_uid_across_many_wraps() {
        let pool = UidPool::new(200_000, 100, 0);
        // A few long-lived leases and many short-lived ones: ten times around the range.
        let long: Vec<UidLease> = (0..7).map(|_| pool.lease().unwrap()).collect();
        let long_uids: HashSet<u32> = long.iter().map(UidLease::uid).collect();
        let mut live: Vec<UidLease> = Vec::new();
        for n in 0..1000 {
            let l = pool.lease().unwrap();
            assert!(
                !long_uids.contains(&l.uid()),
                "{} reused while held",
                l.uid()
            );
            assert!(
                !live.iter().any(|o| o.uid() == l.uid()),
                "{} reused while held",
                l.uid()
            );
            assert!((200_000..200_100).contains(&l.uid()));
            live.push(l);
            if n % 3 == 0 {
                live.remove(0);
            }
            if live.len() > 50 {
                live.drain(..25);
            }
        }
        assert_eq!(pool.leased() as usize, long.len() + live.len());
    }

    #[test]
    fn exhaustion_is_an_error_until_a_lease_is_dropped() {
        let pool = UidPool::new(1000, 3, 2);
        let all: Vec<UidLease> = (0..3).map(|_| pool.lease().unwrap()).collect();
        let mut uids: Vec<u32> = all.iter().map(UidLease::uid).collect();
        uids.sort_unstable();
        assert_eq!(uids, [1000, 1001, 1002]);
        let err = pool.lease().err().expect("the range is full");
        assert_eq!(
            err,
            UidsExhausted {
                span: 3,
                base: 1000
            }
        );
        assert!(err.to_string().contains("all 3 sandbox host uids"), "{err}");
        drop(all);
        assert_eq!(pool.leased(), 0);
        // Next-fit: the search goes on from where it stopped, then wraps.
        let again = pool.lease().unwrap();
        assert!((1000..1003).contains(&again.uid()));
    }

    #[test]
    fn a_released_uid_is_reused_as_late_as_possible() {
        let pool = UidPool::new(5000, 10, 0);
        let first = pool.lease().unwrap();
        assert_eq!(first.uid(), 5000);
        drop(first);
        // The other nine come first.
        let next: Vec<u32> = (0..9).map(|_| pool.lease().unwrap().uid()).collect();
        assert_eq!(next, (5001..5010).collect::<Vec<_>>());
    }
}
