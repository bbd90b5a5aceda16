//! A bounded in-memory ring of a function's log lines (`GET /functions/<id>/logs`).

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines kept per function.
pub const LOG_LINES_MAX: usize = 1000;
/// Bytes kept per function.
pub const LOG_BYTES_MAX: usize = 1 << 20;

/// One captured line.
#[derive(serde::Serialize)]
pub struct LogLine {
    pub time_ms: u64,
    #[serde(rename = "requestId")]
    pub request_id: String,
    pub stream: &'static str,
    pub message: String,
}

/// The newest lines of a function, oldest dropped first.
#[derive(Default)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    pub dropped: u64,
}

impl LogRing {
    /// Adds the lines of `text`.
    pub fn push(&mut self, request_id: &str, stderr: bool, text: &[u8]) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for line in String::from_utf8_lossy(text).lines() {
            self.bytes += line.len();
            self.lines.push_back(LogLine {
                time_ms,
                request_id: request_id.to_string(),
                stream: if stderr { "stderr" } else { "stdout" },
                message: line.to_string(),
            });
        }
        while self.lines.len() > LOG_LINES_MAX || self.bytes > LOG_BYTES_MAX {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.message.len();
            self.dropped += 1;
        }
    }

    /// Adds lines printed while an instance started.
    pub fn extend_init(&mut self, lines: &[String]) {
        for l in lines {
            self.push("init", false, l.as_bytes());
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &LogLine> {
        self.lines.iter()
    }
}
