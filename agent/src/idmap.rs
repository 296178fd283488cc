//! A hash map for keys made of kernel-issued integers (pids, tids, fds, socket cookies).
//! They are not chosen by whoever sends us bytes, so the DoS-resistant (and several times
//! slower) SipHash of `std` buys nothing on this hot path.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl IdHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_stay_distinct() {
        let mut m: IdMap<(u32, u64), u64> = IdMap::default();
        for pid in 0..50u32 {
            for cookie in 0..200u64 {
                m.insert((pid, cookie), u64::from(pid) * 1000 + cookie);
            }
        }
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(&(7, 123)), Some(&7123));
    }
}
