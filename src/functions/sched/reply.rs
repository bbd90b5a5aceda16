//! Instances' answers: frames read from an instance's channel become log
//! lines, HTTP replies (a RESPONSE, checked: hearth owns framing and
//! connection headers) or a failed instance (a runtime that exited, a broken
//! protocol).

use std::time::Instant;

use super::CorePool;
use crate::http::reply::{Header, Reply};
use crate::metrics::ErrorKind;
use crate::protocol::{self, FrameType, HEADER_BYTES};

impl CorePool {
    /// Handles the whole frames at the start of `input` from instance `i`;
    /// returns the bytes they took. Stops early once the instance is gone
    /// (failed, retired or moving to another core).
    pub(super) fn frames(&mut self, i: usize, input: &[u8], now: Instant) -> usize {
        let id = self.insts[i].id;
        let mut pos = 0;
        while self.slot_of(id).is_some() {
            let rest = &input[pos..];
            let inst = &mut self.insts[i];
            let h = match protocol::parse_header(rest) {
                Ok(Some(h)) if rest.len() >= h.frame_len() => h,
                Ok(_) => break,
                Err(e) => {
                    let note = format!("instance broke the protocol: {e}");
                    self.broke_protocol(i, &note, now);
                    break;
                }
            };
            let meta = &rest[HEADER_BYTES..HEADER_BYTES + h.meta_len];
            let body = &rest[HEADER_BYTES + h.meta_len..h.frame_len()];
            pos += h.frame_len();
            match h.kind {
                FrameType::Log => {
                    let rid_text = match &inst.busy {
                        Some(b) if b.rid == h.request_id => b.request_id.as_str(),
                        _ => "",
                    };
                    // Bounded work: LOG frames come from untrusted code.
                    inst.log_intake.take(
                        &inst.function,
                        rid_text,
                        h.flags & protocol::LOG_STDERR != 0,
                        body,
                        now,
                    );
                }
                FrameType::Response | FrameType::Error
                    if inst.busy.as_ref().is_some_and(|b| b.rid == h.request_id) =>
                {
                    self.finished(i, h.kind, meta, body, now);
                }
                FrameType::StreamHead | FrameType::StreamChunk | FrameType::StreamEnd
                    if inst.busy.as_ref().is_some_and(|b| b.rid == h.request_id) =>
                {
                    self.stream_frame(i, h.kind, meta, body, now);
                }
                other => {
                    let note = format!("unexpected {other:?} frame for request {}", h.request_id);
                    self.broke_protocol(i, &note, now);
                }
            }
        }
        pos
    }

    /// Retires instance `i` if, idle (no request of it in flight), it has
    /// begun a frame other than a LOG frame of at most
    /// [`protocol::IDLE_FRAME_BYTES_MAX`]; `rest` is its input after the
    /// whole frames. Nothing else is owed by an idle instance, and what it
    /// sends is charged to no request: unchecked, a partial frame of up to
    /// 9 MiB per instance would sit in hearth's memory.
    pub(super) fn unsolicited(&mut self, i: usize, rest: &[u8], now: Instant) {
        let inst = &self.insts[i];
        if inst.busy.is_some() || rest.is_empty() {
            return;
        }
        let what = match protocol::parse_header(rest) {
            Ok(Some(h))
                if h.kind == FrameType::Log && h.frame_len() <= protocol::IDLE_FRAME_BYTES_MAX =>
            {
                return
            }
            Ok(Some(h)) => format!("a {:?} frame of {} bytes", h.kind, h.frame_len()),
            // Less than a header, or bad bytes `frames` has already failed it for.
            Ok(None) | Err(_) => return,
        };
        let note = format!(
            "instance retired: it sent {what} while no request of it was running (hearth reads at most a {}-byte LOG frame from an idle instance)",
            protocol::IDLE_FRAME_BYTES_MAX
        );
        eprintln!("hearth: function {}: {note}", inst.function.spec.id);
        self.broke_protocol(i, &note, now);
    }

    /// Fails instance `i`, which broke the protocol, after noting why in its
    /// function's log as a line of the host's.
    pub(super) fn broke_protocol(&mut self, i: usize, note: &str, now: Instant) {
        let f = &self.insts[i].function;
        f.logs.lock().unwrap().push("host", true, note.as_bytes());
        self.instance_failed(i, now, "the instance broke the protocol");
    }

    /// Instance `i` answered its request with a RESPONSE or an ERROR frame.
    fn finished(&mut self, i: usize, kind: FrameType, meta: &[u8], body: &[u8], now: Instant) {
        let inst = &self.insts[i];
        let busy = inst.busy.as_ref().expect("answered while busy");
        let (to, f) = (busy.to, inst.function.clone());
        let served = super::Served {
            sent: busy.started,
            cold: busy.cold,
        };
        let reply = if kind == FrameType::Response {
            match response_reply(meta, body) {
                // Lambda's `Invoke` answers the function's payload with 200,
                // whatever the function put in its frame: a status of its own
                // (429, 404) must not pass for the service's throttle or
                // not-found, which callers retry or drop the event on.
                Ok((reply, _)) if self.is_service(to) => service_payload(reply),
                Ok((reply, dropped)) => {
                    if !dropped.is_empty() {
                        let note =
                            format!("[hearth] left out of the response: {}", dropped.join(", "));
                        f.logs
                            .lock()
                            .unwrap()
                            .push(&busy.request_id, true, note.as_bytes());
                    }
                    reply
                }
                Err(bad) => {
                    f.metrics.error(ErrorKind::Handler);
                    bad
                }
            }
        } else if let Some(how) = runtime_exit(meta) {
            // The runtime died under the request: a crash, not a handler error.
            let why = format!("the function's runtime exited (Runtime.ExitError: {how})");
            return self.instance_failed(i, now, &why);
        } else if self.is_service(to) {
            f.metrics.error(ErrorKind::Handler);
            service_error_reply(meta)
        } else {
            f.metrics.error(ErrorKind::Handler);
            handler_error_reply(meta)
        };
        self.answer_running(self.insts[i].id, to, reply, Some(served));
        self.request_done(i, now);
    }

    /// Instance `i` answered its request (the answer is queued): its time is
    /// counted, and it serves the next request (if its function's fit lets
    /// it) or idles.
    pub(super) fn request_done(&mut self, i: usize, now: Instant) {
        let inst = &mut self.insts[i];
        let busy = inst.busy.take().expect("answered while busy");
        inst.handle.answered();
        let f = inst.function.clone();
        let took = now.saturating_duration_since(busy.started);
        inst.busy_done += took;
        inst.last_took = took;
        self.preempt.done(took);
        f.metrics.observe_duration(took.as_micros() as u64);
        let id = &f.spec.id;
        if self.insts[i].ahead.is_some() {
            self.run_ahead(i, now);
        } else {
            self.after_request(i, now);
        }
        // The queue head may have waited long enough to scale out.
        self.grow(id, now);
    }
}

/// The 502 for a handler that threw: its error type and message, as the agent reported them.
fn handler_error_reply(meta: &[u8]) -> Reply {
    let m: serde_json::Value = serde_json::from_slice(meta).unwrap_or_default();
    let body = serde_json::to_vec(&serde_json::json!({
        "error": "the function failed",
        "code": "function_error",
        "errorType": m["errorType"],
        "errorMessage": m["errorMessage"],
    }))
    .expect("json");
    Reply::new(502, "application/json", body)
}

/// The answer to a service API `Invoke` that a function's RESPONSE gives: its
/// body as the payload, with 200 and none of its headers (only hearth's
/// errors have other statuses, see [`service_reply`]).
fn service_payload(reply: Reply) -> Reply {
    Reply::new(200, "application/json", reply.body)
}

/// `X-Amz-Function-Error`: the marker of a failed invocation in a 200 answer.
pub(super) const FUNCTION_ERROR: &str = "x-amz-function-error";
/// Bytes of the invocation's log returned by `X-Amz-Log-Type: Tail` (Lambda's 4 KB).
pub const LOG_TAIL_BYTES: usize = 4096;

/// A handler error answered through the service API, as Lambda answers it:
/// 200, `X-Amz-Function-Error: Unhandled`, and the runtime's error object
/// (`errorMessage`, `errorType`, and `trace` when the runtime gave one).
pub(super) fn service_error_reply(meta: &[u8]) -> Reply {
    let m: serde_json::Value = serde_json::from_slice(meta).unwrap_or_default();
    let mut out = serde_json::json!({
        "errorMessage": m["errorMessage"],
        "errorType": m["errorType"],
    });
    if m["trace"].is_array() {
        out["trace"] = m["trace"].clone();
    }
    function_error(out)
}

fn function_error(payload: serde_json::Value) -> Reply {
    Reply::new(200, "application/json", payload.to_string().into_bytes())
        .with_header(FUNCTION_ERROR, "Unhandled")
}

/// A Lambda service error: Lambda's status, `x-amzn-ErrorType`, and a body
/// botocore reads (`Type`, `message`, and `code` as the type again).
fn service_error(status: u16, kind: &'static str, message: &str) -> Reply {
    let body = serde_json::json!({ "Type": "User", "message": message, "code": kind });
    Reply::new(status, "application/json", body.to_string().into_bytes())
        .with_header("x-amzn-errortype", kind)
}

/// Turns the answer to a service API `Invoke` into Lambda's shape: the
/// handler's result or error passes with `X-Amz-Executed-Version`, the
/// request id and, when asked, the log tail; hearth's own errors become
/// Lambda's (a timeout or crash is a function error in a 200, as Lambda
/// reports them; a full queue, or a request that waited in it for an
/// instance until its deadline without running, is `TooManyRequestsException`,
/// as Lambda answers when it has no capacity: the handler did not fail).
pub(super) fn service_reply(reply: Reply, s: &super::ServiceInvoke) -> Reply {
    use std::borrow::Cow;
    let handler_answered =
        reply.status == 200 || reply.headers.iter().any(|(k, _)| k == FUNCTION_ERROR);
    let mut out = if handler_answered {
        reply
    } else {
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        let message = v["error"].as_str().unwrap_or("the invocation failed");
        match (reply.status, v["code"].as_str().unwrap_or("")) {
            (_, "function_timeout") => function_error(serde_json::json!({
                "errorType": "Sandbox.Timedout",
                "errorMessage": format!("RequestId: {} Error: {message}", s.request_id),
            })),
            (_, "init_error") => {
                let (error_type, message) = message
                    .split_once(": ")
                    .unwrap_or(("Runtime.InitError", message));
                function_error(serde_json::json!({
                    "errorType": error_type,
                    "errorMessage": format!("RequestId: {} Error: {message}", s.request_id),
                }))
            }
            (_, "instance_crashed") | (_, "bad_function_response") => {
                function_error(serde_json::json!({
                    "errorType": "Runtime.ExitError",
                    "errorMessage": format!("RequestId: {} Error: {message}", s.request_id),
                }))
            }
            (429, _) | (_, "queue_timeout") => {
                service_error(429, "TooManyRequestsException", message)
                    .with_header("retry-after", "1")
            }
            (404, _) => service_error(404, "ResourceNotFoundException", message),
            (413, _) => service_error(413, "RequestTooLargeException", message),
            (503, _) => service_error(503, "ServiceException", message),
            (status, _) => service_error(status.max(500), "ServiceException", message),
        }
    };
    out.headers.push((
        Cow::Borrowed("x-amz-executed-version"),
        Cow::Owned(s.version.clone()),
    ));
    if !s.request_id.is_empty() {
        out.headers.push((
            Cow::Borrowed("x-amzn-requestid"),
            Cow::Owned(s.request_id.clone()),
        ));
    }
    if let (true, Some(f)) = (s.tail, &s.function) {
        out.headers.push((
            Cow::Borrowed("x-amz-log-result"),
            Cow::Owned(log_tail(f, &s.request_id)),
        ));
    }
    out
}

/// Base64 of the last [`LOG_TAIL_BYTES`] of what invocation `request_id` logged.
pub(super) fn log_tail(f: &super::Function, request_id: &str) -> String {
    use base64::Engine as _;
    let logs = f.logs.lock().unwrap();
    let mut text = String::new();
    for line in logs.lines().filter(|l| &*l.request_id == request_id) {
        text.push_str(&line.message);
        text.push('\n');
    }
    let mut start = text.len().saturating_sub(LOG_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[start..])
}

/// How the runtime process ended, when `meta` is the ERROR the agent sends for one that died
/// mid-request.
fn runtime_exit(meta: &[u8]) -> Option<String> {
    let m = serde_json::from_slice::<serde_json::Value>(meta).ok()?;
    if m["errorType"] != "Runtime.ExitError" {
        return None;
    }
    // The agent says "RequestId: <id> Error: <how>"; the request id is the caller's already.
    let message = m["errorMessage"].as_str().unwrap_or("");
    let how = message
        .split_once(" Error: ")
        .map_or(message, |(_, how)| how);
    Some(how.to_string())
}

/// Headers hearth owns on the wire: framing and connection management are
/// decided by hearth, never by a handler (RFC 9110 §7.6.1 hop-by-hop fields
/// among them, so no handler can switch a proxy in front into a tunnel).
const RESERVED_HEADERS: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "date",
    "server",
];

/// An RFC 9110 field name: a non-empty token.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An RFC 9110 field value: visible bytes, spaces and tabs, no controls.
fn is_field_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// Builds the HTTP answer from a RESPONSE frame's metadata and body. Header
/// fields that are not valid RFC 9110 names and values, or that hearth owns,
/// are left out and described in the second value (for the function's log).
/// `Err` is the 502 for a response hearth will not send.
pub(super) fn response_reply(meta: &[u8], body: &[u8]) -> Result<(Reply, Vec<String>), Reply> {
    #[derive(serde::Deserialize)]
    struct Meta {
        status: u16,
        #[serde(default)]
        headers: Vec<Header>,
    }
    match serde_json::from_slice::<Meta>(meta) {
        // hearth never sends an informational answer for a handler: a 101 would
        // tell a proxy in front to hand the connection over as a raw tunnel.
        Ok(m) if !(200..=599).contains(&m.status) => Err(Reply::error(
            502,
            "bad_function_response",
            &format!(
                "the function answered status {}; a function's status must be 200-599",
                m.status
            ),
        )),
        Ok(m) => {
            let mut dropped = Vec::new();
            let headers = m
                .headers
                .into_iter()
                .filter(|(k, v)| {
                    if !is_token(k) || !is_field_value(v) {
                        dropped.push(format!("invalid header field {:?}", k));
                        return false;
                    }
                    if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(k)) {
                        let k = k.to_ascii_lowercase();
                        dropped.push(format!("header {k:?} (set by hearth)"));
                        return false;
                    }
                    true
                })
                .collect();
            Ok((
                Reply {
                    status: m.status,
                    headers,
                    body: body.to_vec(),
                    close: false,
                },
                dropped,
            ))
        }
        Err(_) => Err(Reply::error(
            502,
            "bad_function_response",
            "the runtime sent a response hearth could not read",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn informational_and_out_of_range_statuses_become_502() {
        for status in [100, 101, 103, 199, 600, 0] {
            let meta = format!(r#"{{"status":{status},"headers":[["upgrade","websocket"]]}}"#);
            let bad = response_reply(meta.as_bytes(), b"").expect_err("refused");
            assert_eq!(bad.status, 502, "status {status}");
        }
        assert!(response_reply(br#"{"status":200}"#, b"").is_ok());
    }

    #[test]
    fn header_fields_must_be_valid_and_not_hearths() {
        let meta = serde_json::json!({
            "status": 200,
            "headers": [
                ["x-ok", "fine value\twith tab"],
                ["transfer-encoding\t", "chunked"],
                ["content-length ", "5"],
                ["Content-Length", "5"],
                ["Upgrade", "websocket"],
                ["bad name", "v"],
                ["", "v"],
                ["x-nul", "a\u{0}b"],
                ["x-ctl", "a\u{1b}b"],
                ["x\u{0}n", "v"],
                ["x-utf8", "héllo"],
            ]
        });
        let (reply, dropped) = response_reply(meta.to_string().as_bytes(), b"body").expect("ok");
        let names: Vec<&str> = reply.headers.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, ["x-ok", "x-utf8"]);
        assert_eq!(dropped.len(), 9, "{dropped:?}");
    }

    #[test]
    fn service_invocations_get_lambdas_shapes() {
        let s = crate::functions::ServiceInvoke {
            version: "3".into(),
            request_id: "rid".into(),
            ..Default::default()
        };
        let header = |r: &Reply, name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string())
        };
        let json = |r: &Reply| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap();
        let ok = service_reply(Reply::new(200, "application/json", b"42".to_vec()), &s);
        assert_eq!((ok.status, ok.body.as_slice()), (200, &b"42"[..]));
        assert_eq!(header(&ok, "x-amz-executed-version").as_deref(), Some("3"));
        assert_eq!(header(&ok, "x-amzn-requestid").as_deref(), Some("rid"));
        assert_eq!(header(&ok, FUNCTION_ERROR), None);

        let timeout = service_reply(Reply::error(504, "function_timeout", "took too long"), &s);
        assert_eq!(timeout.status, 200);
        assert_eq!(
            header(&timeout, FUNCTION_ERROR).as_deref(),
            Some("Unhandled")
        );
        assert_eq!(json(&timeout)["errorType"], "Sandbox.Timedout");
        // Expired in the queue, never run: no function error, a throttle.
        let expired = service_reply(Reply::error(504, "queue_timeout", "no instance"), &s);
        assert_eq!(
            (expired.status, header(&expired, FUNCTION_ERROR)),
            (429, None)
        );
        assert_eq!(json(&expired)["code"], "TooManyRequestsException");
        // The function's code failed to load: its error, not the service's.
        let init = Reply::error(502, "init_error", "Runtime.ImportModuleError: no index");
        let init = service_reply(init, &s);
        assert_eq!(
            (init.status, header(&init, FUNCTION_ERROR)),
            (200, Some("Unhandled".to_string()))
        );
        assert_eq!(json(&init)["errorType"], "Runtime.ImportModuleError");
        let crash = service_reply(Reply::error(502, "instance_crashed", "gone"), &s);
        assert_eq!(json(&crash)["errorType"], "Runtime.ExitError");

        let busy = service_reply(Reply::error(429, "too_many_requests", "full"), &s);
        assert_eq!(busy.status, 429);
        assert_eq!(
            header(&busy, "x-amzn-errortype").as_deref(),
            Some("TooManyRequestsException")
        );
        assert_eq!(json(&busy)["message"], "full");
        let missing = service_reply(Reply::error(404, "function_not_found", "no"), &s);
        assert_eq!(json(&missing)["code"], "ResourceNotFoundException");

        let thrown = service_error_reply(
            br#"{"errorType":"TypeError","errorMessage":"x","trace":["TypeError: x"]}"#,
        );
        assert_eq!(thrown.status, 200);
        assert_eq!(json(&thrown)["trace"][0], "TypeError: x");
    }
}
