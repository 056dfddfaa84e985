//! Random numbers for spreading work out (backoff jitter, trace and span
//! ids), from the standard library's per-process random hash keys: spread,
//! not cryptographic quality, and no extra dependency.

use std::hash::{BuildHasher, Hasher};

/// A random 64-bit number.
pub fn u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos().into()),
    );
    hasher.finish()
}

/// A random number in [0, 1).
pub fn fraction() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn fractions_stay_in_range_and_vary() {
        let draws: Vec<f64> = (0..64).map(|_| super::fraction()).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        let first = draws[0];
        assert!(draws.iter().any(|draw| *draw != first), "{draws:?}");
    }
}
