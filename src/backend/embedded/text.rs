//! Turning sampled token bytes into the text a client may see: whole UTF-8
//! characters only, and nothing of a stop sequence (text that could still
//! become one is held back until it cannot).

/// Assembles token pieces into text and applies stop sequences.
#[derive(Debug)]
pub(super) struct TextAssembler {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Decoded text not yet released, because it may start a stop sequence.
    held: String,
}

/// What one token piece released.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Released {
    pub text: String,
    /// A stop sequence was produced: generation ends, the stop text is dropped.
    pub stopped: bool,
}

impl TextAssembler {
    pub(super) fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            partial: Vec::new(),
            held: String::new(),
        }
    }

    pub(super) fn push(&mut self, piece: &[u8]) -> Released {
        self.partial.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.partial) {
            Ok(_) => self.partial.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            // Bytes that can never form a character: pass them on as U+FFFD.
            Err(_) => self.partial.len(),
        };
        let complete: Vec<u8> = self.partial.drain(..valid).collect();
        self.held.push_str(&String::from_utf8_lossy(&complete));
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            let text = self.held[..at].to_owned();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_stop_prefix_suffix();
        let text = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases whatever is held when generation ends for another reason.
    pub(super) fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        text
    }

    /// Length in bytes of the longest end of `held` that begins a stop sequence.
    fn longest_stop_prefix_suffix(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&len| stop.is_char_boundary(len) && self.held.ends_with(&stop[..len]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_are_released_whole() {
        let mut text = TextAssembler::new(Vec::new());
        let bytes = "é".as_bytes();
        assert_eq!(text.push(&bytes[..1]).text, "");
        assert_eq!(text.push(&bytes[1..]).text, "é");
    }

    #[test]
    fn stop_sequences_end_generation_and_are_not_emitted() {
        let mut text = TextAssembler::new(vec!["END".into()]);
        assert_eq!(text.push(b"one E").text, "one ");
        assert_eq!(text.push(b"N").text, "");
        assert_eq!(
            text.push(b"Dtwo"),
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        let mut text = TextAssembler::new(vec!["END".into()]);
        assert_eq!(text.push(b"EN").text, "");
        assert_eq!(text.push(b"Ough").text, "ENOugh");
        assert_eq!(text.push(b" E").text, " ");
        assert_eq!(text.finish(), "E");
    }
}
