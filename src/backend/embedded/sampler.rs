//! Choosing the next token of one sequence: grammar mask, frequency
//! penalty, temperature and nucleus sampling with a seeded generator, so the
//! same seed gives the same tokens.

use std::collections::HashMap;

/// Probability below which a token is left out before nucleus sampling,
/// relative to the most likely one: sorting all 49k entries of a vocabulary
/// each step would cost more than the rest of sampling, and the tokens cut
/// carry a negligible share of the mass.
const NEGLIGIBLE_RELATIVE_PROBABILITY: f32 = 1e-7;

#[derive(Debug)]
pub(super) struct Sampler {
    temperature: f32,
    top_p: f32,
    frequency_penalty: f32,
    generated: HashMap<u32, u32>,
    history: Vec<u32>,
    no_repeat_ngram: Option<usize>,
    said: Vec<Vec<u32>>,
    /// Logits after penalties, kept to reuse its allocation every step.
    adjusted: Vec<f32>,
    rng: SplitMix64,
}

impl Sampler {
    pub(super) fn new(temperature: f32, top_p: f32, frequency_penalty: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            frequency_penalty,
            generated: HashMap::new(),
            history: Vec::new(),
            no_repeat_ngram: None,
            said: Vec::new(),
            adjusted: Vec::new(),
            rng: SplitMix64(seed),
        }
    }

    /// Avoids tokens that would repeat an n-gram of size `n` already drawn,
    /// or complete one of the `said` token sequences whole, unless nothing
    /// else is allowed.
    pub(super) fn avoiding_repeated_ngrams(mut self, rule: Option<(u32, Vec<Vec<u32>>)>) -> Self {
        if let Some((n, said)) = rule {
            self.no_repeat_ngram = Some(n.max(2) as usize);
            self.said = said
                .into_iter()
                .filter(|tokens| tokens.len() >= 2)
                .collect();
        }
        self
    }

    /// Tokens that would complete an n-gram already drawn, or a said sequence.
    fn repeating(&self) -> Vec<u32> {
        let Some(n) = self.no_repeat_ngram else {
            return Vec::new();
        };
        let completing_said = self.said.iter().filter_map(|tokens| {
            let (last, start) = tokens.split_last()?;
            self.history.ends_with(start).then_some(*last)
        });
        let mut repeating: Vec<u32> = completing_said.collect();
        if self.history.len() >= n {
            let tail = &self.history[self.history.len() - (n - 1)..];
            repeating.extend(
                self.history
                    .windows(n)
                    .filter(|window| &window[..n - 1] == tail)
                    .map(|window| window[n - 1]),
            );
        }
        repeating
    }

    /// Picks a token among those `allowed`; `None` when nothing is allowed.
    pub(super) fn sample(&mut self, logits: &[f32], allowed: impl Fn(u32) -> bool) -> Option<u32> {
        let repeating = self.repeating();
        let token = if repeating.is_empty() {
            self.pick(logits, &allowed)
        } else {
            self.pick(logits, |token| {
                allowed(token) && !repeating.contains(&token)
            })
            .or_else(|| self.pick(logits, &allowed))
        }?;
        *self.generated.entry(token).or_default() += 1;
        self.history.push(token);
        Some(token)
    }

    fn pick(&mut self, logits: &[f32], allowed: impl Fn(u32) -> bool) -> Option<u32> {
        // Penalties touch only the tokens drawn so far: adjust a reused copy
        // of the logits instead of looking every vocabulary entry up.
        let mut adjusted = std::mem::take(&mut self.adjusted);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        if self.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(logit) = adjusted.get_mut(token as usize) {
                    *logit -= self.frequency_penalty * count as f32;
                }
            }
        }
        let token = if self.temperature <= 0.0 {
            candidates(&adjusted, &allowed)
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(token, _)| token)
        } else {
            self.draw(&adjusted, &allowed)
        };
        self.adjusted = adjusted;
        token
    }

    fn draw(&mut self, logits: &[f32], allowed: &impl Fn(u32) -> bool) -> Option<u32> {
        let max = candidates(logits, allowed)
            .map(|(_, logit)| logit)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut weighted: Vec<(u32, f32)> = candidates(logits, allowed)
            .map(|(token, logit)| (token, ((logit - max) / self.temperature).exp()))
            .filter(|&(_, weight)| weight >= NEGLIGIBLE_RELATIVE_PROBABILITY)
            .collect();
        weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = weighted.iter().map(|&(_, weight)| weight).sum();
        let mut kept = 0.0;
        let nucleus = weighted
            .iter()
            .take_while(|&&(_, weight)| {
                let inside = kept < self.top_p * total;
                kept += weight;
                inside
            })
            .count()
            .max(1);
        weighted.truncate(nucleus);
        let mass: f32 = weighted.iter().map(|&(_, weight)| weight).sum();
        let mut point = self.rng.next_unit() * mass;
        for &(token, weight) in &weighted {
            if point < weight {
                return Some(token);
            }
            point -= weight;
        }
        weighted.last().map(|&(token, _)| token)
    }
}

/// The allowed tokens with a finite logit, as (token, logit).
fn candidates<'a>(
    logits: &'a [f32],
    allowed: &'a impl Fn(u32) -> bool,
) -> impl Iterator<Item = (u32, f32)> + 'a {
    logits
        .iter()
        .enumerate()
        .map(|(token, &logit)| (token as u32, logit))
        .filter(move |&(token, logit)| logit.is_finite() && allowed(token))
}

/// A small, fast, seedable generator (Steele, Lea and Flood's SplitMix64).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_best_allowed_token() {
        let mut sampler = Sampler::new(0.0, 1.0, 0.0, 1);
        let logits = [0.1, 3.0, 2.0];
        assert_eq!(sampler.sample(&logits, |_| true), Some(1));
        assert_eq!(sampler.sample(&logits, |token| token != 1), Some(2));
        assert_eq!(sampler.sample(&logits, |_| false), None);
    }

    #[test]
    fn frequency_penalty_lowers_repeated_tokens() {
        let mut sampler = Sampler::new(0.0, 1.0, 2.0, 1);
        let logits = [0.0, 1.0];
        assert_eq!(sampler.sample(&logits, |_| true), Some(1));
        assert_eq!(sampler.sample(&logits, |_| true), Some(0), "1 - 2 < 0");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut sampler = Sampler::new(1.0, 0.9, 0.0, seed);
            (0..20)
                .map(|_| sampler.sample(&logits, |_| true).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn repeated_ngrams_are_avoided_unless_nothing_else_is_allowed() {
        let mut sampler =
            Sampler::new(0.0, 1.0, 0.0, 1).avoiding_repeated_ngrams(Some((2, vec![])));
        let logits = [0.0, 1.0, 2.0];
        // 2, then 2 again would repeat the bigram (2, 2) only once it exists.
        assert_eq!(sampler.sample(&logits, |_| true), Some(2));
        assert_eq!(sampler.sample(&logits, |_| true), Some(2));
        assert_eq!(
            sampler.sample(&logits, |_| true),
            Some(1),
            "(2, 2) is taken"
        );
        assert_eq!(sampler.sample(&logits, |_| true), Some(2));
        assert_eq!(
            sampler.sample(&logits, |token| token == 1),
            Some(1),
            "(2, 1) repeats, but it is the only allowed token"
        );
    }

    #[test]
    fn text_already_said_is_not_repeated_whole() {
        let logits = [0.0, 1.0, 2.0];
        let mut sampler =
            Sampler::new(0.0, 1.0, 0.0, 1).avoiding_repeated_ngrams(Some((4, vec![vec![2, 2, 2]])));
        assert_eq!(sampler.sample(&logits, |_| true), Some(2));
        assert_eq!(sampler.sample(&logits, |_| true), Some(2));
        assert_eq!(
            sampler.sample(&logits, |_| true),
            Some(1),
            "2, 2, 2 was said"
        );
    }

    #[test]
    fn a_small_nucleus_keeps_only_the_top_token() {
        let mut sampler = Sampler::new(1.0, 0.01, 0.0, 3);
        let logits = [0.0, 5.0, 1.0];
        for _ in 0..10 {
            assert_eq!(sampler.sample(&logits, |_| true), Some(1));
        }
    }
}
