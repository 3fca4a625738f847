//! The fuzz target `hybrid_answer` (fuzz/) and the replay of its corpus
//! (`tests.rs`): whatever the VMM answers to `CONNECT`, [`parse_answer`]
//! must not panic, and what it accepts must be exactly `OK <u32>\n`.

use super::{parse_answer, AnswerError, MAX_ANSWER_LEN};

/// Parses `data` as an answer and checks the result.
pub fn answer(data: &[u8]) {
    match parse_answer(data) {
        Ok(port) => {
            assert!(
                data.len() <= MAX_ANSWER_LEN,
                "{} bytes accepted",
                data.len()
            );
            let digits = data
                .strip_prefix(b"OK ")
                .and_then(|d| d.strip_suffix(b"\n"))
                .unwrap_or_default();
            assert!(
                !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
                "{:?} accepted",
                data.escape_ascii().to_string()
            );
            assert_eq!(parse_answer(format!("OK {port}\n").as_bytes()), Ok(port));
        }
        Err(error) => {
            assert_eq!(error == AnswerError::Closed, data.is_empty());
            let _ = (error.to_string(), error.is_transient());
        }
    }
}
