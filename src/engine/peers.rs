//! Open connections per client address, counted across all cores, so one
//! client cannot hold every connection slot (slow-body and idle floods).
//!
//! The counts live in a fixed table of atomic counters indexed by a keyed
//! hash of the address: memory is bounded whatever the number of clients,
//! no lock is taken, and the key (random per server) keeps a client from
//! choosing addresses that share a slot with someone else's. Two addresses
//! can still share a slot by chance; they then share its limit. IPv6 clients
//! are counted per /64, since one host usually holds a whole /64.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Slots in the table (256 KiB of counters).
const SLOTS: usize = 1 << 16;

/// Per-address connection counters shared by all workers.
pub struct PeerTable {
    slots: Box<[AtomicU32]>,
    key: std::collections::hash_map::RandomState,
    max: u32,
}

impl PeerTable {
    /// A table allowing `max` open connections per address.
    pub fn new(max: usize) -> PeerTable {
        PeerTable {
            slots: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            key: std::collections::hash_map::RandomState::new(),
            max: u32::try_from(max).unwrap_or(u32::MAX).max(1),
        }
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU32 {
        let mut h = self.key.build_hasher();
        match ip {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => h.write(&v4.octets()),
                None => h.write(&a.octets()[..8]),
            },
        }
        &self.slots[h.finish() as usize % SLOTS]
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_held_to_its_limit_and_gets_slots_back() {
        let t = PeerTable::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| t.try_open(a)));
        assert!(!t.try_open(a));
        t.close(a);
        assert!(t.try_open(a));
        assert!(!t.try_open(a));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let t = PeerTable::new(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(t.try_open(a) && t.try_open(b));
        assert!(!t.try_open(a));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(t.try_open(mapped) && t.try_open(v4));
        assert!(!t.try_open(v4));
    }
}
