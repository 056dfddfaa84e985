//! Which instance of a pool a call goes to first, and the order of the
//! rest for failover. Decisions only: the pool supplies each eligible
//! instance's load and prefix match and follows the order.

use std::hash::{DefaultHasher, Hash, Hasher};

/// How a pool spreads calls over its instances.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// To the instance holding the longest prefix of the prompt, while its
    /// load stays within `PrefixRule::max_load_gap` of the least loaded;
    /// otherwise least-loaded.
    Prefix(PrefixRule),
    /// The less loaded of two instances drawn at random.
    LeastLoaded,
    /// By consistent hashing of the call's session key, so one session
    /// stays on one instance while the set of instances changes little;
    /// least-loaded for a call without one.
    Session,
    /// Each instance in turn.
    RoundRobin,
}

/// When a prefix match wins over load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefixRule {
    /// Share of the prompt's blocks an instance must hold.
    pub min_match: f64,
    /// Calls in flight the matching instance may have beyond the least
    /// loaded instance.
    pub max_load_gap: usize,
}

/// An instance that may take the call.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Its position in the pool.
    pub index: usize,
    /// A stable identity (its endpoint), for session hashing.
    pub key: String,
    pub in_flight: usize,
    /// Leading prompt blocks it holds.
    pub matched: usize,
}

/// What the policy knows of the call.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// Whole blocks in its prompt.
    pub blocks: usize,
    pub session: Option<&'a str>,
    /// A counter that advances once per call, for round-robin.
    pub turn: usize,
    /// Two random draws in [0, 1), for the power of two choices.
    pub draws: (f64, f64),
}

/// Why the first instance was chosen, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    PrefixMatch,
    LeastLoaded,
    Session,
    RoundRobin,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PrefixMatch => "prefix_match",
            Reason::LeastLoaded => "least_loaded",
            Reason::Session => "session",
            Reason::RoundRobin => "round_robin",
        }
    }
}

/// The candidates' indices, the chosen one first and the rest least loaded
/// first, with the reason for the choice. `None` without candidates.
pub fn order(
    routing: Routing,
    candidates: &[Candidate],
    call: Call<'_>,
) -> Option<(Vec<usize>, Reason)> {
    if candidates.is_empty() {
        return None;
    }
    let (first, reason) = match routing {
        Routing::Prefix(rule) => prefix(rule, candidates, call),
        Routing::LeastLoaded => (two_choices(candidates, call.draws), Reason::LeastLoaded),
        Routing::Session => match call.session {
            Some(session) => (rendezvous(candidates, session), Reason::Session),
            None => (two_choices(candidates, call.draws), Reason::LeastLoaded),
        },
        Routing::RoundRobin => (call.turn % candidates.len(), Reason::RoundRobin),
    };
    let mut rest: Vec<&Candidate> = candidates
        .iter()
        .enumerate()
        .filter(|(position, _)| *position != first)
        .map(|(_, candidate)| candidate)
        .collect();
    rest.sort_by_key(|candidate| candidate.in_flight);
    let order = std::iter::once(candidates[first].index)
        .chain(rest.into_iter().map(|candidate| candidate.index))
        .collect();
    Some((order, reason))
}

/// Position of the longest match if it is long enough and its instance is
/// not too far above the least loaded; else of the least loaded.
fn prefix(rule: PrefixRule, candidates: &[Candidate], call: Call<'_>) -> (usize, Reason) {
    let least = least_loaded(candidates);
    let lightest = candidates[least].in_flight;
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, candidate)| candidate.in_flight <= lightest + rule.max_load_gap)
        .max_by_key(|(position, candidate)| {
            // Equal matches (a system prompt every instance was sent) go
            // to the less loaded.
            (
                candidate.matched,
                std::cmp::Reverse(candidate.in_flight),
                std::cmp::Reverse(*position),
            )
        })
        .map(|(position, _)| position);
    let long_enough = |position: usize| {
        let matched = candidates[position].matched;
        matched > 0 && matched as f64 >= rule.min_match * call.blocks as f64
    };
    match best {
        Some(position) if long_enough(position) => (position, Reason::PrefixMatch),
        _ => (least, Reason::LeastLoaded),
    }
}

/// Position of the least loaded candidate (the first of equals).
fn least_loaded(candidates: &[Candidate]) -> usize {
    candidates
        .iter()
        .enumerate()
        .min_by_key(|(_, candidate)| candidate.in_flight)
        .map_or(0, |(position, _)| position)
}

/// The less loaded of two candidates drawn at random (the first drawn on a
/// tie): nearly as good as the least loaded, without every caller piling
/// onto the same instance between two updates of the counts.
fn two_choices(candidates: &[Candidate], draws: (f64, f64)) -> usize {
    let draw =
        |fraction: f64| ((fraction * candidates.len() as f64) as usize).min(candidates.len() - 1);
    let (a, b) = (draw(draws.0), draw(draws.1));
    if candidates[b].in_flight < candidates[a].in_flight {
        b
    } else {
        a
    }
}

/// Highest-random-weight hashing: each session goes to the candidate whose
/// hash with it is highest, so an instance coming or going moves only the
/// sessions that were (or will be) on it.
fn rendezvous(candidates: &[Candidate], session: &str) -> usize {
    candidates
        .iter()
        .enumerate()
        .max_by_key(|(_, candidate)| {
            let mut hasher = DefaultHasher::new();
            session.hash(&mut hasher);
            candidate.key.hash(&mut hasher);
            hasher.finish()
        })
        .map_or(0, |(position, _)| position)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: PrefixRule = PrefixRule {
        min_match: 0.5,
        max_load_gap: 2,
    };

    fn candidates(loads_and_matches: &[(usize, usize)]) -> Vec<Candidate> {
        loads_and_matches
            .iter()
            .enumerate()
            .map(|(index, (in_flight, matched))| Candidate {
                index: index * 10,
                key: format!("http://10.0.0.{index}:8080"),
                in_flight: *in_flight,
                matched: *matched,
            })
            .collect()
    }

    fn call(blocks: usize) -> Call<'static> {
        Call {
            blocks,
            session: None,
            turn: 0,
            draws: (0.0, 0.99),
        }
    }

    #[test]
    fn prefix_goes_to_the_longest_match_within_the_load_gap() {
        let pool = candidates(&[(0, 2), (2, 8), (1, 0)]);
        let (first, reason) = order(Routing::Prefix(RULE), &pool, call(10)).unwrap();
        assert_eq!((first[0], reason), (10, Reason::PrefixMatch));
        assert_eq!(&first[1..], [0, 20], "the rest least loaded first");
        // The match is on an instance three calls above the least loaded.
        let busy = candidates(&[(0, 2), (3, 8), (1, 0)]);
        let (first, reason) = order(Routing::Prefix(RULE), &busy, call(10)).unwrap();
        assert_eq!(first[0], 0, "the best match within the gap");
        assert_eq!(reason, Reason::LeastLoaded, "2 of 10 blocks is too short");
        let (first, reason) = order(Routing::Prefix(RULE), &busy, call(4)).unwrap();
        assert_eq!((first[0], reason), (0, Reason::PrefixMatch));
    }

    #[test]
    fn prefix_without_a_match_is_least_loaded() {
        let pool = candidates(&[(3, 0), (1, 0), (2, 0)]);
        let chosen = order(Routing::Prefix(RULE), &pool, call(10)).unwrap();
        assert_eq!(chosen, (vec![10, 20, 0], Reason::LeastLoaded));
        let shared = candidates(&[(2, 3), (0, 3), (1, 3)]);
        let (first, reason) = order(Routing::Prefix(RULE), &shared, call(4)).unwrap();
        assert_eq!(
            (first[0], reason),
            (10, Reason::PrefixMatch),
            "equal matches: the lighter"
        );
        let empty = order_of(Routing::Prefix(RULE), &[], call(0));
        assert!(empty.is_none());
    }

    fn order_of(routing: Routing, pool: &[Candidate], call: Call<'_>) -> Option<Vec<usize>> {
        order(routing, pool, call).map(|(order, _)| order)
    }

    #[test]
    fn least_loaded_takes_the_lighter_of_two_draws() {
        let pool = candidates(&[(5, 0), (1, 0), (0, 0)]);
        let mut draws = call(0);
        draws.draws = (0.0, 0.4);
        assert_eq!(order_of(Routing::LeastLoaded, &pool, draws).unwrap()[0], 10);
        draws.draws = (0.5, 0.0);
        assert_eq!(order_of(Routing::LeastLoaded, &pool, draws).unwrap()[0], 10);
        draws.draws = (0.99, 0.0);
        assert_eq!(order_of(Routing::LeastLoaded, &pool, draws).unwrap()[0], 20);
    }

    #[test]
    fn a_session_stays_put_and_moves_only_with_its_instance() {
        let pool = candidates(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let sessions: Vec<String> = (0..200).map(|n| format!("run-{n}")).collect();
        let placed = |pool: &[Candidate]| -> Vec<usize> {
            sessions
                .iter()
                .map(|session| {
                    let mut with = call(0);
                    with.session = Some(session);
                    order_of(Routing::Session, pool, with).unwrap()[0]
                })
                .collect()
        };
        let before = placed(&pool);
        assert_eq!(before, placed(&pool), "the same session, the same instance");
        for index in [0, 10, 20, 30] {
            assert!(before.contains(&index), "every instance gets sessions");
        }
        let without_third: Vec<Candidate> =
            pool.iter().filter(|c| c.index != 20).cloned().collect();
        let after = placed(&without_third);
        for (was, is) in before.iter().zip(&after) {
            if *was != 20 {
                assert_eq!(was, is, "only the removed instance's sessions move");
            }
        }
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let pool = candidates(&[(9, 0), (0, 0), (0, 0)]);
        let firsts: Vec<usize> = (0..6)
            .map(|turn| {
                let mut with = call(0);
                with.turn = turn;
                order_of(Routing::RoundRobin, &pool, with).unwrap()[0]
            })
            .collect();
        assert_eq!(firsts, [0, 10, 20, 0, 10, 20]);
    }
}
