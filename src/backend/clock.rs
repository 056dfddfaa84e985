//! Timing of one generation, measured the same way for every backend.

use std::time::{Duration, Instant};

use super::Chunk;

/// Measures time to first text and total time from when a request arrived.
#[derive(Clone, Copy, Debug)]
pub struct StreamClock {
    started: Instant,
    first_text: Option<Instant>,
}

impl StreamClock {
    pub fn start(started: Instant) -> Self {
        Self {
            started,
            first_text: None,
        }
    }

    pub fn observe(&mut self, chunk: &Chunk) {
        if matches!(chunk, Chunk::Text(text) if !text.is_empty()) && self.first_text.is_none() {
            self.first_text = Some(Instant::now());
        }
    }

    /// Time to the first non-empty text; the total time when none came.
    pub fn time_to_first_token(&self) -> Duration {
        self.first_text
            .map_or_else(|| self.started.elapsed(), |first| first - self.started)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
