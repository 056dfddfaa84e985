//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, run by hand on
//! a nightly toolchain: `make fuzz`), each checking a property that must
//! hold for any input, not only that nothing panics. The tests below run
//! every target over a bounded set of mutated seeds on the stable
//! toolchain, so CI exercises them on each change.

use prost::Message as _;

use crate::{
    backend::{
        Chunk,
        http::{Framing, RecordSplitter, parse_all},
        ollama, openai,
    },
    proto,
    server::{Limits, RoleModels, validate},
    task::{self, DecomposeRequest, EnhanceRequest, ProjectContext, TaskSpec},
};

/// What a target made of one input, so a bounded run can check that its
/// inputs reach both sides of the property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The input never reached the code under test (e.g. not a message).
    Skipped,
    Accepted,
    Refused,
}

const LIMITS: Limits = Limits {
    default_max_tokens: 512,
    task_max_tokens: 1024,
    max_tokens_limit: 8192,
    max_prompt_bytes: 256 * 1024,
    role_models: RoleModels {
        enhance: None,
        decompose: None,
        generate: None,
    },
};

/// Request validation: any bytes decoding as a request either validate or
/// are refused with an error naming a field.
pub fn request_validation(data: &[u8]) -> Outcome {
    let Some((&which, message)) = data.split_first() else {
        return Outcome::Skipped;
    };
    let verdict = match which % 3 {
        0 => proto::GenerateRequest::decode(message)
            .map(|request| validate::generate(request, &LIMITS).map(drop)),
        1 => proto::EnhanceTaskRequest::decode(message)
            .map(|request| validate::enhance(request, &LIMITS).map(drop)),
        _ => proto::DecomposeTaskRequest::decode(message)
            .map(|request| validate::decompose(request, &LIMITS).map(drop)),
    };
    match verdict {
        Err(_) => Outcome::Skipped,
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(error)) => {
            assert!(!error.field.is_empty(), "{error:?}");
            assert!(error.to_string().starts_with("invalid "), "{error}");
            Outcome::Refused
        }
    }
}

/// Structured output: whatever a model writes, an accepted decomposition
/// obeys the rules (count in range, titles distinct from each other and
/// the parent, complexity below the parent's, dependencies on earlier
/// subtasks only), and an accepted enhancement has its fields filled.
pub fn structured_output(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let request = decomposition_request();
    let decomposed = task::judge_answer(&text, &request);
    if let Ok(task::Parsed {
        value: subtasks, ..
    }) = &decomposed
    {
        let count = subtasks.len() as u32;
        assert!((request.min_subtasks..=request.max_subtasks).contains(&count));
        for (index, subtask) in subtasks.iter().enumerate() {
            assert!(u32::from(subtask.complexity) < 6, "{subtask:?}");
            assert!(
                subtask
                    .depends_on
                    .iter()
                    .all(|dependency| (*dependency as usize) < index),
                "{subtask:?}"
            );
            assert!(!task::same_meaning(&subtask.title, &request.task.title));
            for earlier in &subtasks[..index] {
                assert!(!task::same_meaning(&subtask.title, &earlier.title));
            }
        }
    }
    let request = enhancement_request();
    let enhanced = task::judge_answer(&text, &request);
    if let Ok(task::Parsed {
        value: enhancement, ..
    }) = &enhanced
    {
        assert!(!enhancement.title.trim().is_empty());
        assert!(!enhancement.description.trim().is_empty());
    }
    if decomposed.is_ok() || enhanced.is_ok() {
        Outcome::Accepted
    } else {
        Outcome::Refused
    }
}

/// Wire framing: records cut from a byte stream do not depend on how the
/// stream was split into reads, and parsing them never panics and stops at
/// the first record that ends or breaks the stream.
pub fn wire_framing(data: &[u8]) -> Outcome {
    let Some((&control, body)) = data.split_first() else {
        return Outcome::Skipped;
    };
    let framing = if control & 1 == 0 {
        Framing::Ndjson
    } else {
        Framing::Sse
    };
    let whole = split_records(framing, [body]);
    let step = usize::from(control >> 1) + 1;
    let pieces = split_records(framing, body.chunks(step));
    assert_eq!(whole, pieces, "records depend on read boundaries");
    let Ok(records) = whole else {
        return Outcome::Refused;
    };
    let mut completed = false;
    for parsed in [
        parse_all(ollama::record_parser(), &records),
        parse_all(openai::record_parser(), &records),
    ] {
        let ends = parsed
            .iter()
            .filter(|result| !matches!(result, Ok(None) | Ok(Some(Chunk::Text(_)))))
            .count();
        assert_eq!(ends, 1, "exactly one completion or error: {parsed:?}");
        completed |= matches!(parsed.last(), Some(Ok(Some(Chunk::Done(_)))));
    }
    if completed {
        Outcome::Accepted
    } else {
        Outcome::Refused
    }
}

fn split_records<'a>(
    framing: Framing,
    reads: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<String>, String> {
    let mut splitter = RecordSplitter::new(framing);
    let mut records = Vec::new();
    for read in reads {
        records.extend(splitter.push(read)?);
    }
    records.extend(splitter.finish());
    Ok(records)
}

fn decomposition_request() -> DecomposeRequest {
    DecomposeRequest {
        task: TaskSpec {
            title: "Add two-factor authentication".into(),
            complexity: Some(6),
            ..TaskSpec::default()
        },
        context: ProjectContext::default(),
        min_subtasks: 3,
        max_subtasks: 4,
        model: None,
        sampling: crate::backend::Sampling {
            max_tokens: 512,
            ..Default::default()
        },
    }
}

fn enhancement_request() -> EnhanceRequest {
    EnhanceRequest {
        task: TaskSpec {
            title: "Fix login".into(),
            ..TaskSpec::default()
        },
        kind: None,
        context: ProjectContext::default(),
        model: None,
        sampling: crate::backend::Sampling {
            max_tokens: 512,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    //! A bounded stand-in for the fuzzer: seeds mutated by a fixed-seed
    //! generator (bit flips, byte insertions and deletions, truncation,
    //! splices of two seeds), a fixed number of inputs per target times
    //! `RIGGER_FUZZ_SCALE` (default 1) for longer runs.

    use super::*;

    struct Mutator(u64);

    impl Mutator {
        /// SplitMix64.
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound.max(1) as u64) as usize
        }

        fn mutate(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
            let mut input = seeds[self.below(seeds.len())].clone();
            for _ in 0..=self.below(4) {
                let at = self.below(input.len() + 1);
                match self.below(5) {
                    0 if at < input.len() => input[at] ^= 1 << self.below(8),
                    1 => input.insert(at, self.next() as u8),
                    2 if at < input.len() => {
                        input.remove(at);
                    }
                    3 => input.truncate(at),
                    _ => {
                        let other = &seeds[self.below(seeds.len())];
                        let from = self.below(other.len() + 1);
                        input.splice(at..at, other[from..].iter().copied());
                    }
                }
            }
            input
        }
    }

    fn scale() -> usize {
        std::env::var("RIGGER_FUZZ_SCALE")
            .ok()
            .and_then(|scale| scale.parse().ok())
            .unwrap_or(1)
    }

    /// Runs `target` on the seeds and their mutations; both outcomes must
    /// occur, or the run did not test the property.
    fn fuzz(target: fn(&[u8]) -> Outcome, seeds: &[Vec<u8>], runs: usize) {
        let mut mutator = Mutator(0x00f0_221e);
        let mut seen = std::collections::HashMap::<Outcome, usize>::new();
        for seed in seeds {
            *seen.entry(target(seed)).or_default() += 1;
        }
        for _ in 0..runs * scale() {
            *seen.entry(target(&mutator.mutate(seeds))).or_default() += 1;
        }
        for outcome in [Outcome::Accepted, Outcome::Refused] {
            assert!(
                seen.contains_key(&outcome),
                "no input {outcome:?}: {seen:?}"
            );
        }
        eprintln!("{seen:?}");
    }

    fn tagged(tag: u8, message: &impl prost::Message) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend(message.encode_to_vec());
        bytes
    }

    #[test]
    fn request_validation_names_a_field_for_every_refusal() {
        let generate = proto::GenerateRequest {
            prompt: "Write a haiku.".into(),
            model: "m".into(),
            json_schema: r#"{"type":"object","properties":{"a":{"type":"string"}}}"#.into(),
            stop: vec!["\n\n".into()],
            sampling: Some(proto::SamplingOptions {
                max_tokens: Some(64),
                temperature: Some(0.5),
                top_p: Some(0.9),
                seed: Some(7),
                frequency_penalty: Some(0.1),
            }),
            ..Default::default()
        };
        let task = proto::Task {
            id: "T-1".into(),
            title: "Add search".into(),
            description: Some("Search the catalogue.".into()),
            complexity: Some(5),
            context_files: vec!["src/search.rs".into()],
            ..Default::default()
        };
        let enhance = proto::EnhanceTaskRequest {
            task: Some(task.clone()),
            kind: proto::EnhancementKind::Clarify as i32,
            ..Default::default()
        };
        let decompose = proto::DecomposeTaskRequest {
            task: Some(task),
            min_subtasks: 3,
            max_subtasks: 5,
            ..Default::default()
        };
        fuzz(
            request_validation,
            &[
                tagged(0, &generate),
                tagged(1, &enhance),
                tagged(2, &decompose),
            ],
            // Most mutations break the encoding, and decoding is cheap.
            50_000,
        );
    }

    #[test]
    fn structured_output_accepted_answers_obey_the_rules() {
        let subtask = |title: &str, depends_on: &str| {
            format!(
                r#"{{"title":"{title}","description":"Carry out this part of the work and check that it behaves as expected.","complexity":3,"depends_on":{depends_on},"reasoning":"It is a distinct step."}}"#
            )
        };
        let decomposition = format!(
            r#"{{"subtasks":[{},{},{}]}}"#,
            subtask("Design the login flow", "[]"),
            subtask("Store one-time secrets", "[0]"),
            subtask("Verify codes at sign-in", "[0,1]")
        );
        let enhancement = r#"{"kind":"specify","title":"Fix the login timeout","description":"Sessions expire after one minute; make them last the configured thirty minutes.","acceptance_criteria":["A session lasts thirty minutes"]}"#;
        fuzz(
            structured_output,
            &[decomposition.into_bytes(), enhancement.as_bytes().to_vec()],
            3000,
        );
    }

    #[test]
    fn wire_framing_is_independent_of_read_boundaries() {
        let ndjson = concat!(
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"Hi"},"done":false}"#,
            "\n",
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":1}"#,
            "\n"
        );
        let sse = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            ": comment\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut seeds = Vec::new();
        for step in [0u8, 6, 30] {
            for (parity, body) in [(0, ndjson), (1, sse)] {
                let mut seed = vec![step | parity];
                seed.extend_from_slice(body.as_bytes());
                seeds.push(seed);
            }
        }
        fuzz(wire_framing, &seeds, 10_000);
    }
}
