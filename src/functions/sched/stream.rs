//! Streamed answers: an instance answers a request with STREAM_HEAD, any
//! number of STREAM_CHUNKs and STREAM_END instead of one RESPONSE. Per
//! client they become a chunked HTTP answer written as the chunks come
//! (function URLs), AWS event-stream messages (the service API's
//! `InvokeWithResponseStream`), or one collected answer (a plain `Invoke`
//! of a streaming handler, as Lambda buffers it).
//!
//! The scheduler only translates; the engine writes the bytes and stops
//! reading the instance's channel while the client holds too much unsent
//! output, which is what bounds the memory a slow client costs.

use std::borrow::Cow;
use std::time::Instant;

use super::{Action, CorePool, InstId, ServiceInvoke};
use crate::http::eventstream;
use crate::http::reply::{Reply, ReplyTo};
use crate::metrics::ErrorKind;
use crate::protocol::{FrameType, STREAM_BYTES_MAX};

/// Largest answer collected for a plain `Invoke` of a streaming handler: the
/// invocation payload limit of Lambda's synchronous `Invoke` (6 MiB).
pub const BUFFERED_BYTES_MAX: usize = 6 << 20;

/// How a streamed answer reaches its client.
pub(super) enum Mode {
    /// Chunks go to a function URL client as they come.
    Http,
    /// Chunks go as `PayloadChunk` events, the end as `InvokeComplete`.
    Events,
    /// Chunks are collected into one answer.
    Buffer(Reply),
    /// The rest of the stream is read and dropped. `answered`: the client got
    /// its answer already (a refused head, over the limit, a failure), so the
    /// entries under its `ReplyTo` are gone and may already be its next
    /// request's; otherwise the client left, and its entries are cleared when
    /// the stream ends.
    Discard { answered: bool },
}

/// A streamed answer in progress, kept per instance (in `CorePool::streams`):
/// an instance streams the answer to the one request it runs, while a
/// connection's `ReplyTo` is reused by its next request.
pub(super) struct Streaming {
    mode: Mode,
    /// Body bytes streamed so far.
    bytes: usize,
}

impl Streaming {
    /// The stream is being dropped because its client left (see
    /// [`Mode::Discard`]).
    pub(super) fn client_left(&self) -> bool {
        matches!(self.mode, Mode::Discard { answered: false })
    }
}

impl CorePool {
    /// Handles a STREAM_* frame of instance `i`'s running request.
    pub(super) fn stream_frame(
        &mut self,
        i: usize,
        kind: FrameType,
        meta: &[u8],
        body: &[u8],
        now: Instant,
    ) {
        let busy = self.insts[i]
            .busy
            .as_ref()
            .expect("stream frames while busy");
        let to = busy.to;
        let started = self.streams.contains_key(&self.insts[i].id);
        match kind {
            FrameType::StreamHead if !started => self.stream_head(i, to, meta),
            FrameType::StreamChunk if started => self.stream_chunk(i, to, body),
            FrameType::StreamEnd if started => self.stream_end(i, to, meta, now),
            _ => {
                let note = format!("unexpected {kind:?} frame (stream started: {started})");
                self.broke_protocol(i, &note, now);
            }
        }
    }

    fn stream_head(&mut self, i: usize, to: ReplyTo, meta: &[u8]) {
        let f = self.insts[i].function.clone();
        let (head, bad) = match super::reply::response_reply(meta, b"") {
            Ok((head, dropped)) => {
                if !dropped.is_empty() {
                    let rid = self.insts[i].busy.as_ref().map(|b| b.request_id.clone());
                    let note = format!("[hearth] left out of the response: {}", dropped.join(", "));
                    f.logs.lock().unwrap().push(
                        rid.as_deref().unwrap_or(""),
                        true,
                        note.as_bytes(),
                    );
                }
                (head, None)
            }
            Err(bad) => (
                Reply::new(200, "application/octet-stream", Vec::new()),
                Some(bad),
            ),
        };
        let service = self.service.get(&to).map(|s| s.stream);
        let mode = match (bad, service) {
            (Some(bad), _) => {
                f.metrics.error(ErrorKind::Handler);
                self.reply(to, bad);
                Mode::Discard { answered: true }
            }
            _ if self.gone.contains(&to) => Mode::Discard { answered: false },
            (None, None) => {
                self.actions.push_back(Action::StreamHead { to, head });
                Mode::Http
            }
            (None, Some(true)) => {
                let s = self.service.get(&to).expect("looked up above");
                let head = events_head(s);
                self.actions.push_back(Action::StreamHead { to, head });
                Mode::Events
            }
            // Lambda's plain `Invoke` answers the payload, whatever the status.
            (None, Some(false)) => Mode::Buffer(Reply {
                status: 200,
                ..head
            }),
        };
        let id = self.insts[i].id;
        self.streams.insert(id, Streaming { mode, bytes: 0 });
    }

    fn stream_chunk(&mut self, i: usize, to: ReplyTo, body: &[u8]) {
        let inst = self.insts[i].id;
        let st = self.streams.get_mut(&inst).expect("stream started");
        st.bytes += body.len();
        let over = match &st.mode {
            Mode::Buffer(_) => st.bytes > BUFFERED_BYTES_MAX,
            _ => st.bytes > STREAM_BYTES_MAX,
        };
        // A client that left gets nothing more (the answer of an earlier
        // request on its connection can no longer be under way here).
        if !matches!(st.mode, Mode::Discard { .. }) && self.gone.contains(&to) {
            st.mode = Mode::Discard { answered: false };
        }
        if over && !matches!(st.mode, Mode::Discard { .. }) {
            let limit = match st.mode {
                Mode::Buffer(_) => BUFFERED_BYTES_MAX,
                _ => STREAM_BYTES_MAX,
            };
            let message = format!("the streamed response exceeds {limit} bytes");
            self.insts[i].function.metrics.error(ErrorKind::Handler);
            let info = serde_json::json!({
                "errorType": "Function.ResponseSizeTooLarge",
                "errorMessage": message,
            });
            let reply = match self.service.contains_key(&to) {
                true => super::reply::service_error_reply(info.to_string().as_bytes()),
                false => Reply::error(502, "response_too_large", &message),
            };
            // The rest of the stream is dropped; a collected answer goes now.
            if let Some(reply) = self.interrupt_stream(inst, to, reply) {
                self.deliver(to, reply, None);
            }
            return;
        }
        match &mut st.mode {
            Mode::Http => self.actions.push_back(Action::StreamData {
                to,
                inst: Some(inst),
                data: body.to_vec(),
            }),
            Mode::Events => self.actions.push_back(Action::StreamData {
                to,
                inst: Some(inst),
                data: eventstream::payload_chunk(body),
            }),
            Mode::Buffer(reply) => reply.body.extend_from_slice(body),
            Mode::Discard { .. } => {}
        }
    }

    fn stream_end(&mut self, i: usize, to: ReplyTo, meta: &[u8], now: Instant) {
        let failed = serde_json::from_slice::<serde_json::Value>(meta)
            .is_ok_and(|m| m.get("errorType").is_some());
        let st = self
            .streams
            .remove(&self.insts[i].id)
            .expect("stream started");
        let f = self.insts[i].function.clone();
        if failed {
            f.metrics.error(ErrorKind::Handler);
        }
        match st.mode {
            Mode::Discard { answered: true } => {}
            Mode::Discard { answered: false } => {
                self.service.remove(&to);
                self.gone.remove(&to);
            }
            Mode::Buffer(reply) => match failed {
                false => self.reply(to, reply),
                true => self.reply(to, super::reply::service_error_reply(meta)),
            },
            Mode::Http => {
                if failed {
                    let rid = self.insts[i].busy.as_ref().map(|b| b.request_id.clone());
                    let note = "[hearth] the handler failed mid-stream; the answer was cut off";
                    f.logs.lock().unwrap().push(
                        rid.as_deref().unwrap_or(""),
                        true,
                        note.as_bytes(),
                    );
                }
                self.end_stream(to, Vec::new(), !failed);
            }
            Mode::Events => {
                let s = self.service.remove(&to).unwrap_or_default();
                let m: serde_json::Value = serde_json::from_slice(meta).unwrap_or_default();
                let error = failed.then(|| {
                    (
                        m["errorType"].as_str().unwrap_or("Unhandled").to_string(),
                        m["errorMessage"].as_str().unwrap_or("").to_string(),
                    )
                });
                let data = complete_event(error, &s);
                self.end_stream(to, data, true);
            }
        }
        self.request_done(i, now);
    }

    /// Queues the end of the stream at `to` (dropped if the client left).
    fn end_stream(&mut self, to: ReplyTo, data: Vec<u8>, complete: bool) {
        if !self.gone.is_empty() && self.gone.remove(&to) {
            return;
        }
        self.actions
            .push_back(Action::StreamEnd { to, data, complete });
    }

    /// An answer decided for `to`, the request instance `inst` streams (a
    /// timeout, a crash, an ERROR frame, the size limit): the stream ends as
    /// failed — cut off for a function URL client, an `InvokeComplete` with
    /// the error for an event stream — and the rest is dropped. Returns the
    /// answer when nothing was sent yet (a collected answer), for the caller
    /// to send.
    pub(super) fn interrupt_stream(
        &mut self,
        inst: InstId,
        to: ReplyTo,
        reply: Reply,
    ) -> Option<Reply> {
        let st = self.streams.get_mut(&inst)?;
        let answered = Mode::Discard { answered: true };
        match std::mem::replace(&mut st.mode, answered) {
            Mode::Buffer(_) => Some(reply),
            Mode::Discard { answered } => {
                st.mode = Mode::Discard { answered };
                None
            }
            Mode::Http => {
                self.end_stream(to, Vec::new(), false);
                None
            }
            Mode::Events => {
                let s = self.service.remove(&to).unwrap_or_default();
                let out = super::reply::service_reply(reply, &s);
                let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap_or_default();
                let code = v["errorType"]
                    .as_str()
                    .or_else(|| v["code"].as_str())
                    .unwrap_or("Unhandled");
                let details = v["errorMessage"]
                    .as_str()
                    .or_else(|| v["message"].as_str())
                    .unwrap_or("");
                let data = complete_event(Some((code.to_string(), details.to_string())), &s);
                self.end_stream(to, data, true);
                None
            }
        }
    }
}

/// The head of an event-stream answer: 200 and the invocation's headers.
fn events_head(s: &ServiceInvoke) -> Reply {
    let mut head = Reply::new(200, eventstream::CONTENT_TYPE, Vec::new());
    head.headers.push((
        Cow::Borrowed("x-amz-executed-version"),
        Cow::Owned(s.version.clone()),
    ));
    if !s.request_id.is_empty() {
        head.headers.push((
            Cow::Borrowed("x-amzn-requestid"),
            Cow::Owned(s.request_id.clone()),
        ));
    }
    head
}

/// The `InvokeComplete` event, with the log tail when it was asked for.
fn complete_event(error: Option<(String, String)>, s: &ServiceInvoke) -> Vec<u8> {
    let tail = match (s.tail, &s.function) {
        (true, Some(f)) => Some(super::reply::log_tail(f, &s.request_id)),
        _ => None,
    };
    let error = error.as_ref().map(|(c, d)| (c.as_str(), d.as_str()));
    eventstream::invoke_complete(error, tail.as_deref())
}

/// The answer to a service `InvokeWithResponseStream` whose function answered
/// with one RESPONSE or failed before streaming: `reply` is the service API
/// answer ([`super::reply::service_reply`]). A handler's answer becomes the
/// event-stream head, one `PayloadChunk` and `InvokeComplete` (with the error
/// of a failed invocation); Lambda's service errors (throttling, not found)
/// stay plain answers.
pub(super) fn events_from_reply(to: ReplyTo, reply: Reply, s: &ServiceInvoke) -> Vec<Action> {
    if reply.status != 200 {
        return vec![Action::Reply {
            to,
            reply,
            served: None,
        }];
    }
    let failed = reply
        .headers
        .iter()
        .any(|(k, _)| k == super::reply::FUNCTION_ERROR);
    let mut actions = vec![Action::StreamHead {
        to,
        head: events_head(s),
    }];
    let error = if failed {
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        Some((
            v["errorType"].as_str().unwrap_or("Unhandled").to_string(),
            v["errorMessage"].as_str().unwrap_or("").to_string(),
        ))
    } else {
        if !reply.body.is_empty() {
            actions.push(Action::StreamData {
                to,
                inst: None,
                data: eventstream::payload_chunk(&reply.body),
            });
        }
        None
    };
    actions.push(Action::StreamEnd {
        to,
        data: complete_event(error, s),
        complete: true,
    });
    actions
}
