//! Result cache of EnhanceTask/DecomposeTask answers: a request identical
//! to an earlier one (task, context, kind or range, model, sampling, seed,
//! backend) is answered from memory. Bounded in entries (least recently used
//! goes first) and in age.
//!
//! Only reproducible requests are cached: greedy ones (the default) and
//! seeded ones. A caller who sets a temperature without a seed asks for a
//! fresh draw each time and gets one.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::backend::Sampling;

/// 128 bits of two independent hashes of the request's canonical form: a
/// collision (which would answer one request with another's result) is
/// astronomically unlikely, and keys stay small whatever the request size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(u64, u64);

impl CacheKey {
    /// Key of a request whose every input is in `canonical` (its `Debug`
    /// form, with the backend it goes to).
    pub fn new(canonical: &str) -> Self {
        let hash = |salt: u64| {
            let mut hasher = DefaultHasher::new();
            salt.hash(&mut hasher);
            canonical.hash(&mut hasher);
            hasher.finish()
        };
        Self(hash(0x9e37_79b9_7f4a_7c15), hash(0xc2b2_ae3d_27d4_eb4f))
    }
}

/// Whether a request's answer is reproducible, hence worth keeping.
pub fn cacheable(sampling: &Sampling) -> bool {
    sampling.seed.is_some() || sampling.temperature.is_none_or(|t| t == 0.0)
}

struct Entry<V> {
    value: V,
    stored: Instant,
    last_used: u64,
}

/// Hit and miss counts and size of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
}

pub struct ResultCache<V> {
    capacity: usize,
    ttl: Duration,
    entries: Mutex<HashMap<CacheKey, Entry<V>>>,
    uses: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone> ResultCache<V> {
    /// A cache of at most `capacity` entries, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            entries: Mutex::new(HashMap::with_capacity(capacity)),
            uses: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The value of `key`, counted as a hit or a miss.
    pub fn get(&self, key: CacheKey) -> Option<V> {
        let found = self.find(key);
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The value of `key` if there is one, counted as a hit; a caller that
    /// finds nothing goes on to [`get`](Self::get).
    pub fn peek(&self, key: CacheKey) -> Option<V> {
        self.find(key)
    }

    fn find(&self, key: CacheKey) -> Option<V> {
        let mut entries = self.lock();
        let found = match entries.get_mut(&key) {
            Some(entry) if entry.stored.elapsed() <= self.ttl => {
                entry.last_used = self.uses.fetch_add(1, Ordering::Relaxed);
                Some(entry.value.clone())
            }
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        };
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    pub fn insert(&self, key: CacheKey, value: V) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, entry| entry.stored.elapsed() <= ttl);
            if entries.len() >= self.capacity
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.last_used)
                    .map(|(key, _)| *key)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key,
            Entry {
                value,
                stored: Instant::now(),
                last_used: self.uses.fetch_add(1, Ordering::Relaxed),
            },
        );
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.lock().len(),
            capacity: self.capacity,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Entry<V>>> {
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_least_recently_used_eviction() {
        let cache = ResultCache::new(2, Duration::from_secs(60));
        let [a, b, c] = ["a", "b", "c"].map(CacheKey::new);
        assert_eq!(cache.get(a), None);
        assert_eq!(cache.peek(b), None, "a peek counts no miss");
        cache.insert(a, 1);
        cache.insert(b, 2);
        assert_eq!(cache.get(a), Some(1), "a is now the most recently used");
        cache.insert(c, 3);
        assert_eq!(cache.get(b), None, "b was the least recently used");
        assert_eq!((cache.get(a), cache.get(c)), (Some(1), Some(3)));
        assert_eq!(
            cache.stats(),
            CacheStats {
                entries: 2,
                capacity: 2,
                hits: 3,
                misses: 2
            }
        );
    }

    #[test]
    fn entries_expire() {
        let cache = ResultCache::new(4, Duration::ZERO);
        let key = CacheKey::new("a");
        cache.insert(key, 1);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(cache.get(key), None);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn only_reproducible_requests_are_cached() {
        let sampling = |temperature, seed| Sampling {
            temperature,
            seed,
            ..Sampling::default()
        };
        assert!(cacheable(&sampling(None, None)));
        assert!(cacheable(&sampling(Some(0.0), None)));
        assert!(cacheable(&sampling(Some(0.8), Some(7))));
        assert!(!cacheable(&sampling(Some(0.8), None)));
    }

    #[test]
    fn different_requests_have_different_keys() {
        assert_ne!(CacheKey::new("a"), CacheKey::new("b"));
        assert_eq!(CacheKey::new("a"), CacheKey::new("a"));
    }
}
