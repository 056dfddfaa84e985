//! What each instance was recently sent, by prompt prefix, so a call can go
//! where its prompt's beginning is most likely still in the runtime's
//! prompt cache.
//!
//! A prompt's text is cut into fixed-size blocks and each block's hash is
//! chained with the one before it: two prompts share their first N hashes
//! exactly when they share their first N blocks (hash collisions aside),
//! so the longest cached prefix is a count of leading hashes found. Entries
//! expire after a time to live, and past a capacity the oldest go first: a
//! runtime's own prompt cache is bounded too, so an old entry is a weak
//! promise.

use std::{
    collections::{HashMap, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    time::{Duration, Instant},
};

/// How prompts are indexed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixSettings {
    /// Bytes per block: the granularity of a match.
    pub block_bytes: usize,
    /// Blocks remembered per instance.
    pub capacity: usize,
    /// How long a block is remembered after it was last sent.
    pub ttl: Duration,
}

/// A prompt's chained block hashes (whole blocks only: a partial last block
/// matches nothing reliably).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptBlocks(Vec<u64>);

impl PromptBlocks {
    pub fn of(text: &str, block_bytes: usize) -> Self {
        let mut chained = 0u64;
        let hashes = text
            .as_bytes()
            .chunks_exact(block_bytes.max(1))
            .map(|block| {
                let mut hasher = DefaultHasher::new();
                chained.hash(&mut hasher);
                block.hash(&mut hasher);
                chained = hasher.finish();
                chained
            })
            .collect();
        Self(hashes)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One instance's recently sent prompt blocks.
#[derive(Debug)]
pub struct PrefixIndex {
    settings: PrefixSettings,
    /// Each block's hash and when it was last sent.
    sent: HashMap<u64, Instant>,
    /// Blocks in the order they were sent; an entry older than the block's
    /// time in `sent` is a stale duplicate.
    order: VecDeque<(u64, Instant)>,
}

impl PrefixIndex {
    pub fn new(settings: PrefixSettings) -> Self {
        Self {
            settings,
            sent: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// How many leading blocks of `prompt` this instance was sent within
    /// the time to live.
    pub fn matched(&self, prompt: &PromptBlocks, now: Instant) -> usize {
        prompt
            .0
            .iter()
            .take_while(|hash| {
                self.sent
                    .get(hash)
                    .is_some_and(|at| now.duration_since(*at) < self.settings.ttl)
            })
            .count()
    }

    /// Notes that `prompt` was sent here at `now`.
    pub fn record(&mut self, prompt: &PromptBlocks, now: Instant) {
        for hash in &prompt.0 {
            self.sent.insert(*hash, now);
            self.order.push_back((*hash, now));
        }
        self.trim(now);
    }

    /// Blocks remembered.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Drops expired blocks, then the oldest past the capacity. The log of
    /// sends is kept within twice the capacity, so a prompt sent over and
    /// over cannot grow it without bound.
    fn trim(&mut self, now: Instant) {
        while let Some(&(hash, at)) = self.order.front() {
            let current = self.sent.get(&hash) == Some(&at);
            let expired = now.duration_since(at) >= self.settings.ttl;
            let over = self.sent.len() > self.settings.capacity
                || self.order.len() > 2 * self.settings.capacity;
            if current && !expired && !over {
                break;
            }
            self.order.pop_front();
            if current {
                self.sent.remove(&hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: PrefixSettings = PrefixSettings {
        block_bytes: 4,
        capacity: 8,
        ttl: Duration::from_secs(60),
    };

    fn blocks(text: &str) -> PromptBlocks {
        PromptBlocks::of(text, SETTINGS.block_bytes)
    }

    #[test]
    fn a_match_counts_the_shared_leading_blocks() {
        let mut index = PrefixIndex::new(SETTINGS);
        let now = Instant::now();
        index.record(&blocks("system: be brief|user: hello"), now);
        assert_eq!(
            index.matched(&blocks("system: be brief|user: hello"), now),
            7
        );
        // Shares "syst" "em: " "be b" "rief" then differs.
        assert_eq!(
            index.matched(&blocks("system: be brief!user: other"), now),
            4
        );
        // The same block later in another prompt is no match: hashes chain.
        assert_eq!(index.matched(&blocks("xxxxsystem: be brief"), now), 0);
        assert_eq!(blocks("abc").len(), 0, "a partial block is not indexed");
    }

    #[test]
    fn entries_expire_and_the_oldest_go_past_the_capacity() {
        let mut index = PrefixIndex::new(SETTINGS);
        let start = Instant::now();
        index.record(&blocks("aaaabbbbcccc"), start);
        assert_eq!(
            index.matched(&blocks("aaaabbbbcccc"), start + SETTINGS.ttl),
            0
        );
        index.record(&blocks("ddddeeeeffffgggghhhhiiii"), start + SETTINGS.ttl);
        assert_eq!(index.len(), 6, "the expired blocks are gone");
        let later = start + SETTINGS.ttl + Duration::from_secs(1);
        index.record(&blocks("jjjjkkkkllllmmmm"), later);
        assert_eq!(index.len(), SETTINGS.capacity);
        assert_eq!(index.matched(&blocks("ddddeeee"), later), 0, "oldest went");
        assert_eq!(index.matched(&blocks("jjjjkkkkllllmmmm"), later), 4);
    }

    #[test]
    fn resending_a_prompt_keeps_the_log_bounded() {
        let mut index = PrefixIndex::new(SETTINGS);
        let now = Instant::now();
        for _ in 0..100 {
            index.record(&blocks("aaaabbbbcccc"), now);
        }
        assert!(index.order.len() <= 2 * SETTINGS.capacity);
        assert_eq!(index.matched(&blocks("aaaabbbbcccc"), now), 3);
    }
}
