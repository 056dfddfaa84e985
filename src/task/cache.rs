//! Result cache of EnhanceTask/DecomposeTask answers: a request identical
//! to an earlier one in every field that decides the answer (task, context,
//! kind or range, model, sampling, seed, backend) is answered from memory.
//! Bounded in entries (least recently used goes first) and in age.
//!
//! Keys are written field by field ([`KeyFields`]), each struct taken apart
//! whole, so a field added later does not compile until it is either keyed
//! or said not to matter.
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

use super::{DecomposeRequest, EnhanceRequest, ProjectContext, TaskSpec};
use crate::backend::{NoRepeat, Sampling};

/// 128 bits of two independent hashes of the request's fields: a collision
/// (which would answer one request with another's result) is astronomically
/// unlikely, and keys stay small whatever the request size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(u64, u64);

impl CacheKey {
    /// Key of `request` for the task named `task` on the backend `backend`
    /// at `endpoint`.
    pub fn of(task: &str, backend: &str, endpoint: &str, request: &impl KeyFields) -> Self {
        let mut key = KeyWriter::default();
        key.field(task).field(backend).field(endpoint);
        request.write_key(&mut key);
        key.finish()
    }
}

/// The fields of a request that decide its answer.
pub trait KeyFields {
    fn write_key(&self, key: &mut KeyWriter);
}

/// Hashes fields in order. `Hash` prefixes strings and lists with their
/// length or a terminator and options with their variant, so fields cannot
/// run into each other: ("ab", "c") and ("a", "bc") give different keys.
pub struct KeyWriter([DefaultHasher; 2]);

impl Default for KeyWriter {
    fn default() -> Self {
        Self(
            [0x9e37_79b9_7f4a_7c15_u64, 0xc2b2_ae3d_27d4_eb4f].map(|salt| {
                let mut hasher = DefaultHasher::new();
                salt.hash(&mut hasher);
                hasher
            }),
        )
    }
}

impl KeyWriter {
    pub fn field(&mut self, value: impl Hash) -> &mut Self {
        for hasher in &mut self.0 {
            value.hash(hasher);
        }
        self
    }

    /// A float by its bits: `Hash` has none for floats, and validated
    /// values are never NaN.
    pub fn float(&mut self, value: Option<f32>) -> &mut Self {
        self.field(value.map(f32::to_bits))
    }

    fn finish(&self) -> CacheKey {
        let [first, second] = &self.0;
        CacheKey(first.finish(), second.finish())
    }
}

impl KeyFields for TaskSpec {
    fn write_key(&self, key: &mut KeyWriter) {
        // The ids name the task in the caller's records; prompts and rules
        // never read them, so the same task under another id has the same
        // answer.
        let Self {
            id: _,
            parent_id: _,
            title,
            description,
            complexity,
            reasoning,
            context_files,
            dependencies,
        } = self;
        key.field(title)
            .field(description)
            .field(complexity)
            .field(reasoning)
            .field(context_files)
            .field(dependencies);
    }
}

impl KeyFields for ProjectContext {
    fn write_key(&self, key: &mut KeyWriter) {
        let Self {
            project,
            prd_excerpt,
        } = self;
        key.field(project).field(prd_excerpt);
    }
}

impl KeyFields for Sampling {
    fn write_key(&self, key: &mut KeyWriter) {
        let Self {
            max_tokens,
            temperature,
            top_p,
            seed,
            frequency_penalty,
            no_repeat,
        } = self;
        key.field(max_tokens)
            .float(*temperature)
            .float(*top_p)
            .field(seed)
            .float(*frequency_penalty);
        let no_repeat = no_repeat.as_ref().map(
            |NoRepeat {
                 ngram,
                 already_said,
             }| (ngram, already_said),
        );
        key.field(no_repeat);
    }
}

impl KeyFields for EnhanceRequest {
    fn write_key(&self, key: &mut KeyWriter) {
        let Self {
            task,
            context,
            kind,
            model,
            sampling,
        } = self;
        task.write_key(key);
        context.write_key(key);
        key.field(kind).field(model);
        sampling.write_key(key);
    }
}

impl KeyFields for DecomposeRequest {
    fn write_key(&self, key: &mut KeyWriter) {
        let Self {
            task,
            context,
            min_subtasks,
            max_subtasks,
            model,
            sampling,
        } = self;
        task.write_key(key);
        context.write_key(key);
        key.field(min_subtasks).field(max_subtasks).field(model);
        sampling.write_key(key);
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
    use std::collections::HashSet;

    use super::*;
    use crate::task::EnhancementKind;

    /// A key for a cache test that needs distinct keys only.
    fn key(name: &str) -> CacheKey {
        let mut key = KeyWriter::default();
        key.field(name);
        key.finish()
    }

    #[test]
    fn hits_misses_and_least_recently_used_eviction() {
        let cache = ResultCache::new(2, Duration::from_secs(60));
        let [a, b, c] = ["a", "b", "c"].map(key);
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
        let a = key("a");
        cache.insert(a, 1);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(cache.get(a), None);
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

    fn task() -> TaskSpec {
        TaskSpec {
            id: "T-1".into(),
            title: "Add rate limiting".into(),
            description: Some("Protect the public API.".into()),
            parent_id: Some("T-0".into()),
            complexity: Some(5),
            reasoning: Some("Abuse was seen.".into()),
            context_files: vec!["src/api.rs".into()],
            dependencies: vec!["T-0 auth".into()],
        }
    }

    fn enhance() -> EnhanceRequest {
        EnhanceRequest {
            task: task(),
            context: ProjectContext {
                project: "Billing".into(),
                prd_excerpt: "excerpt".into(),
            },
            kind: Some(EnhancementKind::Specify),
            model: Some("m".into()),
            sampling: Sampling {
                max_tokens: 256,
                temperature: Some(0.2),
                top_p: Some(0.9),
                seed: Some(7),
                frequency_penalty: Some(0.5),
                no_repeat: Some(NoRepeat {
                    ngram: 4,
                    already_said: vec!["Add rate limiting".into()],
                }),
            },
        }
    }

    fn decompose() -> DecomposeRequest {
        let EnhanceRequest {
            task,
            context,
            model,
            sampling,
            ..
        } = enhance();
        DecomposeRequest {
            task,
            context,
            min_subtasks: 3,
            max_subtasks: 5,
            model,
            sampling,
        }
    }

    fn key_of(request: &impl KeyFields) -> CacheKey {
        CacheKey::of("enhance", "embedded", "in-process", request)
    }

    /// Every variant's key differs from the original's and from each other's.
    fn all_distinct<R: KeyFields + Clone>(original: R, changes: &[fn(&mut R)]) {
        let mut keys = HashSet::from([key_of(&original)]);
        for (index, change) in changes.iter().enumerate() {
            let mut changed = original.clone();
            change(&mut changed);
            assert!(keys.insert(key_of(&changed)), "change {index} kept a key");
        }
    }

    #[test]
    fn requests_differing_in_a_field_that_decides_the_answer_have_different_keys() {
        all_distinct(
            enhance(),
            &[
                |r| r.task.title.push('!'),
                |r| r.task.description = None,
                |r| r.task.complexity = Some(6),
                |r| r.task.reasoning = None,
                |r| r.task.context_files.push("src/limits.rs".into()),
                |r| r.task.dependencies.clear(),
                |r| r.context.project.push('!'),
                |r| r.context.prd_excerpt.clear(),
                // A character moved from one field to the next.
                |r| {
                    r.context.project.push('e');
                    r.context.prd_excerpt.remove(0);
                },
                |r| r.kind = Some(EnhancementKind::Clarify),
                |r| r.kind = None,
                |r| r.model = None,
                |r| r.sampling.max_tokens += 1,
                |r| r.sampling.temperature = None,
                |r| r.sampling.top_p = Some(0.8),
                |r| r.sampling.seed = Some(8),
                |r| r.sampling.frequency_penalty = None,
                |r| r.sampling.no_repeat = None,
                |r| {
                    if let Some(no_repeat) = &mut r.sampling.no_repeat {
                        no_repeat.ngram = 3;
                    }
                },
            ],
        );
        all_distinct(
            decompose(),
            &[
                |r| r.min_subtasks = 2,
                |r| r.max_subtasks = 6,
                |r| r.task.title.push('!'),
                |r| r.model = Some("n".into()),
            ],
        );
    }

    #[test]
    fn task_and_backend_are_part_of_the_key() {
        let request = enhance();
        let keys: HashSet<CacheKey> = [
            ("enhance", "embedded", "in-process"),
            ("decompose", "embedded", "in-process"),
            ("enhance", "ollama", "in-process"),
            ("enhance", "embedded", "http://127.0.0.1:11434"),
        ]
        .into_iter()
        .map(|(task, backend, endpoint)| CacheKey::of(task, backend, endpoint, &request))
        .collect();
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn identical_requests_share_a_key_whatever_their_ids() {
        assert_eq!(key_of(&enhance()), key_of(&enhance()));
        assert_eq!(key_of(&decompose()), key_of(&decompose()));
        let mut renamed = enhance();
        renamed.task.id = "T-9".into();
        renamed.task.parent_id = None;
        assert_eq!(key_of(&renamed), key_of(&enhance()));
    }
}
