//! Open connections and held request-body bytes per client address, counted
//! across all cores, so one client cannot hold every connection slot
//! (slow-body and idle floods) nor the whole input budget (see
//! [`crate::engine::conn`]).
//!
//! The counts live in fixed tables of atomic counters indexed by a keyed
//! hash of the address: memory is bounded whatever the number of clients,
//! no lock is taken, and the key (random per server) keeps a client from
//! choosing addresses that share a slot with someone else's. Two addresses
//! can still share a slot by chance; they then share its limit. IPv6 clients
//! are counted per /64, since one host usually holds a whole /64.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Slots in each table (256 KiB of connection counters, 512 KiB of byte counters).
const SLOTS: usize = 1 << 16;

/// Per-address counters shared by all workers.
pub struct PeerTable {
    slots: Box<[AtomicU32]>,
    /// Request-body bytes charged per address ([`PeerTable::charge_input`]).
    held: Box<[AtomicUsize]>,
    key: std::collections::hash_map::RandomState,
    max: u32,
    in_share: usize,
}

impl PeerTable {
    /// A table allowing `max` open connections and `in_share` bytes of
    /// charged request bodies per address.
    pub fn new(max: usize, in_share: usize) -> PeerTable {
        PeerTable {
            slots: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            held: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            key: std::collections::hash_map::RandomState::new(),
            max: u32::try_from(max).unwrap_or(u32::MAX).max(1),
            in_share,
        }
    }

    fn index(&self, ip: IpAddr) -> usize {
        let mut h = self.key.build_hasher();
        match ip {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => h.write(&v4.octets()),
                None => h.write(&a.octets()[..8]),
            },
        }
        h.finish() as usize % SLOTS
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU32 {
        &self.slots[self.index(ip)]
    }

    /// Counts a new connection from `ip`; false (and nothing counted) when the
    /// address already holds its limit.
    pub fn try_open(&self, ip: IpAddr) -> bool {
        let slot = self.slot(ip);
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max).then_some(n + 1)
        })
        .is_ok()
    }

    /// Forgets a connection counted by [`PeerTable::try_open`].
    pub fn close(&self, ip: IpAddr) {
        let _ = self
            .slot(ip)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Changes the bytes charged to one of `ip`'s bodies from `from` to `to`;
    /// false (and nothing changed) when growing it would take the address past
    /// its share. A body is let in whatever its size while the address holds
    /// nothing else, so a share smaller than one upload slows it, not bars it.
    pub fn charge_input(&self, ip: IpAddr, from: usize, to: usize) -> bool {
        let share = self.in_share;
        self.held[self.index(ip)]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let others = held.saturating_sub(from);
                (to <= from || others == 0 || others.saturating_add(to) <= share)
                    .then_some(others + to)
            })
            .is_ok()
    }

    /// Gives back `n` bytes charged to `ip` by [`PeerTable::charge_input`].
    pub fn release_input(&self, ip: IpAddr, n: usize) {
        if n > 0 {
            let _ =
                self.held[self.index(ip)].fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                    Some(h.saturating_sub(n))
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_held_to_its_limit_and_gets_slots_back() {
        let t = PeerTable::new(3, 0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| t.try_open(a)));
        assert!(!t.try_open(a));
        t.close(a);
        assert!(t.try_open(a));
        assert!(!t.try_open(a));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let t = PeerTable::new(2, 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(t.try_open(a) && t.try_open(b));
        assert!(!t.try_open(a));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(t.try_open(mapped) && t.try_open(v4));
        assert!(!t.try_open(v4));
    }

    #[test]
    fn an_address_holds_at_most_its_share_of_body_bytes() {
        let t = PeerTable::new(8, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        // A lone body gets in whatever its size, a second one only within the share.
        assert!(t.charge_input(a, 0, 500));
        assert!(!t.charge_input(a, 0, 1));
        assert!(t.charge_input(b, 0, 60));
        assert!(t.charge_input(b, 0, 40));
        assert!(!t.charge_input(b, 40, 41), "growing past the share");
        assert!(t.charge_input(b, 40, 10), "shrinking always fits");
        t.release_input(a, 500);
        assert!(t.charge_input(a, 0, 100));
        t.release_input(b, 60);
        t.release_input(b, 10);
        // Nothing charged remains: a lone body of any size fits again.
        assert!(t.charge_input(b, 0, 1000));
    }
}
