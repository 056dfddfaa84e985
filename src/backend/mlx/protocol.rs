//! The worker's line protocol (documented in `worker.py`): one JSON object
//! per line each way, every request and reply tagged with a request id.
//! Prompts travel only as JSON strings.

use serde::{Deserialize, Serialize};

use crate::backend::{GenerationRequest, NoRepeat, http::WireMessage};

/// Longest line the worker may send; a longer one is a protocol error, not
/// unbounded memory.
pub(super) const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Command<'a> {
    Generate {
        id: u64,
        messages: Vec<WireMessage<'a>>,
        max_tokens: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        temperature: Option<f32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        top_p: Option<f32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        frequency_penalty: Option<f32>,
        stop: &'a [String],
        json_schema: Option<&'a serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        no_repeat: Option<&'a NoRepeat>,
    },
    Cancel {
        id: u64,
    },
    /// The call's client is behind: stop generating for it, keeping its place.
    Pause {
        id: u64,
    },
    /// The call's client caught up.
    Resume {
        id: u64,
    },
}

impl<'a> Command<'a> {
    pub(super) fn generate(id: u64, request: &'a GenerationRequest) -> Self {
        let sampling = &request.sampling;
        Command::Generate {
            id,
            messages: WireMessage::all(&request.messages),
            max_tokens: sampling.max_tokens,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            seed: sampling.seed,
            frequency_penalty: sampling.frequency_penalty,
            stop: &request.stop,
            json_schema: request.json_schema.as_ref(),
            no_repeat: sampling.no_repeat.as_ref(),
        }
    }

    /// The command as one protocol line, newline included.
    pub(super) fn line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("commands serialize");
        line.push('\n');
        line
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(super) enum Reply {
    Ready {
        model: String,
        device: String,
        fast_path: bool,
        load_seconds: f64,
        /// Absent from workers that predate it.
        #[serde(default)]
        compute: Option<DeviceReport>,
        #[serde(default)]
        active_memory: Option<u64>,
    },
    Text {
        id: u64,
        text: String,
    },
    Done {
        id: u64,
        finish_reason: String,
        prompt_tokens: u32,
        #[serde(default)]
        cached_tokens: u32,
        generation_tokens: u32,
        prompt_seconds: f64,
        generation_seconds: f64,
        peak_memory: u64,
        #[serde(default)]
        active_memory: Option<u64>,
    },
    Error {
        id: u64,
        message: String,
        #[serde(default)]
        invalid_request: bool,
    },
    /// The worker could not parse a line we sent: we and it disagree.
    ProtocolError {
        message: String,
    },
    Fatal {
        message: String,
    },
}

/// The device the worker computes on, from its `ready` line.
#[derive(Debug, Deserialize, PartialEq)]
pub(super) struct DeviceReport {
    /// `cpu`, `metal`, `cuda`, or `gpu` for another.
    pub kind: String,
    pub name: String,
    /// 0 where MLX does not tell.
    pub memory_total: u64,
}

impl Reply {
    pub(super) fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line)
            .map_err(|error| format!("malformed line from the MLX worker ({error}): {line:.200}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Message, Role, Sampling};

    #[test]
    fn a_prompt_travels_as_a_json_string_on_one_line() {
        let hostile = "'''\"); __import__('os').system('touch /tmp/x') #\n\u{0}end";
        let request = GenerationRequest {
            model: None,
            messages: vec![Message::new(Role::User, hostile)],
            sampling: Sampling {
                max_tokens: 4,
                ..Sampling::default()
            },
            stop: Vec::new(),
            json_schema: None,
            session: None,
        };
        let line = Command::generate(7, &request).line();
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        let decoded: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(decoded["messages"][0]["content"], hostile);
        assert_eq!(decoded["op"], "generate");
        assert_eq!(decoded["id"], 7);
    }

    #[test]
    fn replies_parse_and_garbage_is_an_error() {
        assert_eq!(
            Reply::parse(r#"{"id": 3, "event": "text", "text": "Hi"}"#),
            Ok(Reply::Text {
                id: 3,
                text: "Hi".into()
            })
        );
        let ready = Reply::parse(
            r#"{"event": "ready", "model": "m", "device": "Device(gpu, 0)", "fast_path": false,
                "load_seconds": 1.5, "max_batch": 4, "active_memory": 7,
                "compute": {"kind": "cuda", "name": "NVIDIA H200", "memory_total": 9}}"#,
        );
        let Ok(Reply::Ready {
            compute: Some(compute),
            active_memory: Some(7),
            ..
        }) = ready
        else {
            panic!("{ready:?}");
        };
        assert_eq!((compute.kind.as_str(), compute.memory_total), ("cuda", 9));
        let older = r#"{"event": "ready", "model": "m", "device": "cpu", "fast_path": true, "load_seconds": 1}"#;
        assert!(
            matches!(Reply::parse(older), Ok(Reply::Ready { compute: None, .. })),
            "a worker without device facts still starts"
        );
        for bad in [
            "",
            "not json",
            r#"{"event": "text"}"#,
            r#"{"event": "nope", "id": 1}"#,
        ] {
            assert!(Reply::parse(bad).is_err(), "{bad:?}");
        }
    }
}
