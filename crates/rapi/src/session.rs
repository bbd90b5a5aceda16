//! One instance's Runtime API, sans-IO: which runtime request is parked in
//! `/next`, the invocations queued and in flight, each connection's unparsed
//! bytes and half-read request, and streamed responses being relayed. Input
//! comes as calls (a frame from the host, bytes or the end of a connection,
//! the bootstrap's exit); output goes through an [`Io`] the caller provides
//! (frames to the host, bytes to a connection, closing one, starting the
//! bootstrap). The guest agent's `--runtime-api` mode drives it over epoll.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use hearth_protocol::{self as protocol, FrameType};
use serde_json::{json, Value};

use crate::api::{self, Function, Invocation, Kind, Route};
use crate::http::{self, BodyKind, Head, HttpError};

/// Runtime API connections open at once. Runtime clients use one or two (a
/// pooled `/next` connection, sometimes a fresh one while it is returned to
/// the pool); a connection over the limit is closed as soon as it is
/// accepted, so a runtime cannot make its server hold unbounded buffers.
pub const CONNS_MAX: usize = 64;

/// Bytes a connection may have sent that are not yet read as a request: a
/// head arriving, or requests sent ahead of the answers to earlier ones. A
/// request's body is decoded as it arrives and does not count; a runtime that
/// sends more than this ahead (into a parked `/next`, or pipelined requests
/// while it reads no answers) gets a 413 and the connection closes.
pub const UNREAD_BYTES_MAX: usize = 512 << 10;

/// Decoded request bodies all of an instance's connections may hold at once
/// while they arrive: one response and one error at their limits. A runtime
/// posts one answer at a time; one that posts on many connections at once
/// gets a 413 on the connection that would go over.
pub const BODY_BYTES_IN_FLIGHT_MAX: usize = api::RESPONSE_BYTES_MAX + api::ERROR_BYTES_MAX;

/// Answers queued for a connection and not yet written ([`Io::backlog`]) over
/// which no more of its requests are served until they are: a runtime that
/// pipelines requests and never reads the answers holds this much of its
/// server's memory, plus one answer.
pub const BACKLOG_BYTES_MAX: usize = 64 << 10;

/// A connection, by the slot [`Session::open`] gave it.
pub type ConnId = usize;

/// What a session does to the world.
pub trait Io {
    /// Sends a frame to the host.
    fn frame(
        &mut self,
        kind: FrameType,
        flags: u8,
        id: u32,
        meta: &[u8],
        body: &[u8],
    ) -> io::Result<()>;
    /// Writes all of `bytes` to connection `conn`; false if it broke (the
    /// session then forgets it and calls [`Io::close`]).
    fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool;
    /// Bytes written to `conn` and not yet sent. Over [`BACKLOG_BYTES_MAX`]
    /// the session serves no more of that connection's requests; the caller
    /// stops reading it and calls [`Session::serve`] again once it drained.
    /// A caller that writes synchronously has none.
    fn backlog(&self, _conn: ConnId) -> usize {
        0
    }
    /// The session forgot connection `conn`: close it.
    fn close(&mut self, conn: ConnId);
    /// Starts the bootstrap of `f`, a runtime of `kind` (`argv` is its command line).
    fn spawn(&mut self, kind: Kind, f: &Function, argv: &[String]) -> io::Result<()>;
    /// Wall-clock time, ms since the epoch.
    fn realtime_ms(&self) -> u64;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// No HELLO yet.
    Waiting,
    /// The bootstrap runs and has not polled `/next` yet.
    Initialising,
    Ready,
    /// INIT_ERROR sent.
    Failed,
}

#[derive(Default)]
struct Conn {
    /// Bytes received; those before `pos` are read (dropped at the next receive).
    buf: Vec<u8>,
    pos: usize,
    /// How much of the unread bytes the search for a head's end has seen.
    scanned: usize,
    /// The head of a request whose body is still arriving.
    head: Option<Head>,
    /// That body, decoded so far (not for streamed responses, which are relayed).
    body: Option<(http::BodyStream, Vec<u8>)>,
    continue_sent: bool,
    /// The connection is to close once its current answer is written.
    closing: bool,
    /// The streamed response this connection is relaying, if any.
    relay: Option<StreamIn>,
}

/// A response posted in streaming mode (`Lambda-Runtime-Function-Response-Mode:
/// streaming`), relayed as STREAM_* frames while its body arrives.
struct StreamIn {
    frame_id: u32,
    request_id: String,
    /// A service API invocation: bytes pass as they are, with the trace of an error.
    raw: bool,
    body: http::BodyStream,
    content_type: Option<String>,
    /// The HTTP prelude read so far, while it is awaited.
    prelude: Option<Vec<u8>>,
    head_sent: bool,
}

/// One instance's Runtime API state.
pub struct Session {
    kind: Kind,
    conns: Vec<Option<Conn>>,
    state: State,
    function: Option<Function>,
    /// The INIT_ERROR metadata, also the ERROR of invocations after it.
    init_error: Option<Vec<u8>>,
    started: Instant,
    init_ms: f64,
    /// INVOKE frames not yet handed out: (frame id, meta, body).
    queue: VecDeque<(u32, Value, Vec<u8>)>,
    /// Handed out and not answered.
    current: Option<Invocation>,
    /// The request id of the last invocation answered (a second answer is a 403).
    last_answered: Option<String>,
    /// The connection waiting in `/next`.
    parked: Option<ConnId>,
    /// State of the generator of trace ids (they need to be unique, not secret).
    rng: u64,
    /// The connection whose request just answered an invocation (202).
    answered: Option<ConnId>,
}

impl Session {
    /// A session for a runtime of `kind`; `seed` seeds its trace ids.
    pub fn new(kind: Kind, seed: u64) -> Session {
        Session {
            kind,
            conns: Vec::new(),
            state: State::Waiting,
            function: None,
            init_error: None,
            started: Instant::now(),
            init_ms: 0.0,
            queue: VecDeque::new(),
            current: None,
            last_answered: None,
            parked: None,
            rng: seed | 1,
            answered: None,
        }
    }

    /// Whether the bootstrap's start was reported (READY or INIT_ERROR) as a
    /// failure: its exit is then an init failure too.
    fn initialising(&self) -> bool {
        matches!(self.state, State::Initialising | State::Waiting)
    }

    /// The frame id output of the bootstrap is tagged with: the invocation
    /// in flight, or 0.
    pub fn log_tag(&self) -> u32 {
        self.current.as_ref().map_or(0, |c| c.frame_id)
    }

    /// A slot for a new connection, or `None` over [`CONNS_MAX`] (close it).
    pub fn open(&mut self) -> Option<ConnId> {
        let slot = self.conns.iter().position(Option::is_none);
        if slot.is_none() && self.conns.len() >= CONNS_MAX {
            return None;
        }
        let i = slot.unwrap_or(self.conns.len());
        match slot {
            Some(i) => self.conns[i] = Some(Conn::default()),
            None => self.conns.push(Some(Conn::default())),
        }
        Some(i)
    }

    /// Bytes read from connection `i`; [`Session::serve`] acts on them.
    pub fn received(&mut self, i: ConnId, bytes: &[u8]) {
        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
            // Requests are read by moving `pos`; what they took goes once per
            // receive, not once per request.
            c.buf.drain(..c.pos);
            c.pos = 0;
            c.buf.extend_from_slice(bytes);
        }
    }

    /// Whether connection `i` holds bytes not yet served (requests left for
    /// [`BACKLOG_BYTES_MAX`]): only then can a flushed backlog give
    /// [`Session::serve`] something to do.
    pub fn has_unread(&self, i: ConnId) -> bool {
        self.conns
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.buf.len() > c.pos)
    }

    /// Connection `i` ended or broke: forgets it (a streamed response it was
    /// relaying fails its invocation) and closes it.
    pub fn closed(&mut self, io: &mut impl Io, i: ConnId) {
        let cut = self.conns[i].as_mut().and_then(|c| c.relay.take());
        if let Some(st) = cut {
            // The bootstrap hung up mid-stream: the invocation fails.
            let meta = json!({"errorType": "Runtime.StreamError",
                "errorMessage": "the runtime closed its connection before the streamed response ended"});
            self.end_stream(io, st, meta.to_string().as_bytes());
        }
        self.conns[i] = None;
        if self.parked == Some(i) {
            self.parked = None;
        }
        io.close(i);
    }

    // ----- frames -------------------------------------------------------

    /// A frame from the host.
    pub fn on_frame(
        &mut self,
        io: &mut impl Io,
        kind: FrameType,
        id: u32,
        meta: &[u8],
        body: Vec<u8>,
    ) -> io::Result<()> {
        let meta: Value = if meta.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(meta)
                .map_err(|e| io::Error::other(format!("frame metadata: {e}")))?
        };
        match kind {
            FrameType::Hello => self.on_hello(io, &meta),
            FrameType::Invoke => {
                if let Some(err) = &self.init_error {
                    io.frame(FrameType::Error, 0, id, err, &[])
                } else {
                    self.queue.push_back((id, meta, body));
                    self.dispatch(io)
                }
            }
            other => Err(io::Error::other(format!(
                "unexpected frame {other:?} from the host"
            ))),
        }
    }

    fn on_hello(&mut self, io: &mut impl Io, meta: &Value) -> io::Result<()> {
        match self.state {
            State::Waiting => {
                self.started = Instant::now();
                let f = Function::from_hello(meta);
                self.state = State::Initialising;
                let argv = self.kind.command(&f.task_root);
                if let Err(e) = io.spawn(self.kind, &f, &argv) {
                    let msg = format!("cannot start the runtime {}: {e}", argv.join(" "));
                    self.fail_init(io, "Runtime.InvalidEntrypoint", &msg)?;
                }
                self.function = Some(f);
            }
            State::Initialising => {}
            State::Ready => self.send_ready(io)?,
            State::Failed => {
                let err = self.init_error.clone().unwrap_or_default();
                io.frame(FrameType::InitError, 0, 0, &err, &[])?;
            }
        }
        Ok(())
    }

    fn send_ready(&mut self, io: &mut impl Io) -> io::Result<()> {
        let meta = json!({"init_ms": self.init_ms, "runtime": self.kind.name()});
        io.frame(FrameType::Ready, 0, 0, meta.to_string().as_bytes(), &[])
    }

    fn fail_init(&mut self, io: &mut impl Io, error_type: &str, message: &str) -> io::Result<()> {
        let meta = json!({"errorType": error_type, "errorMessage": message}).to_string();
        self.fail_init_meta(io, meta.into_bytes())
    }

    fn fail_init_meta(&mut self, io: &mut impl Io, meta: Vec<u8>) -> io::Result<()> {
        if self.state == State::Failed {
            return Ok(());
        }
        self.state = State::Failed;
        let report = format!(
            "{}\tundefined\tERROR\tInit failed \t{}\n",
            api::iso_time(io.realtime_ms()),
            String::from_utf8_lossy(&meta)
        );
        io.frame(
            FrameType::Log,
            protocol::LOG_STDERR,
            0,
            &[],
            report.as_bytes(),
        )?;
        io.frame(FrameType::InitError, 0, 0, &meta, &[])?;
        for (id, _, _) in std::mem::take(&mut self.queue) {
            io.frame(FrameType::Error, 0, id, &meta, &[])?;
        }
        self.init_error = Some(meta);
        Ok(())
    }

    /// A fresh X-Ray trace id (splitmix64 over the seeded state).
    fn trace_id(&mut self, now_ms: u64) -> String {
        let mut next = || {
            self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let s = self.rng;
            let z = (s ^ (s >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let r = [next(), next()];
        api::trace_id(now_ms, r)
    }

    /// The bootstrap exited (`message` says how, as Lambda words it): an
    /// init failure, or the invocation in flight fails with `Runtime.ExitError`.
    pub fn on_exit(&mut self, io: &mut impl Io, message: &str) -> io::Result<()> {
        if self.initialising() {
            return self.fail_init(io, "Runtime.ExitError", message);
        }
        if let Some(inv) = self.current.take() {
            let message = format!("RequestId: {} Error: {message}", inv.request_id);
            error_frame(io, inv.frame_id, "Runtime.ExitError", &message)?;
        }
        Ok(())
    }

    // ----- HTTP ----------------------------------------------------------

    /// Serves every complete request buffered on connection `i`. True when
    /// that answered an invocation (202) on `i` and nothing is parked in
    /// `/next`: the runtime's next `/next` is often already on its way, and
    /// one more read of `i` may find it.
    pub fn serve(&mut self, io: &mut impl Io, i: ConnId) -> io::Result<bool> {
        self.answered = None;
        self.serve_buffered(io, i)?;
        let unread = self
            .conns
            .get(i)
            .and_then(Option::as_ref)
            .map_or(0, |c| c.buf.len() - c.pos);
        if unread > UNREAD_BYTES_MAX {
            let msg = format!("more than {UNREAD_BYTES_MAX} bytes sent ahead of the answers");
            self.answer_and_close(io, i, 413, "RequestEntityTooLarge", &msg);
        }
        Ok(self.answered.take() == Some(i) && self.parked.is_none())
    }

    fn serve_buffered(&mut self, io: &mut impl Io, i: ConnId) -> io::Result<()> {
        while self.parked != Some(i) {
            if io.backlog(i) > BACKLOG_BYTES_MAX {
                return Ok(());
            }
            let Some(c) = self.conns[i].as_mut() else {
                return Ok(());
            };
            if c.head.is_none() {
                let unread = &c.buf[c.pos..];
                let parsed = if http::head_end(unread, &mut c.scanned).is_some() {
                    http::parse_head(unread)
                } else if unread.len() > http::HEAD_BYTES_MAX {
                    Err(HttpError::HeadTooLarge)
                } else {
                    Ok(None)
                };
                match parsed {
                    Ok(Some(h)) => {
                        c.pos += h.len;
                        c.scanned = 0;
                        c.continue_sent = false;
                        c.head = Some(h);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let (status, msg) = match e {
                            HttpError::Bad(why) => (400, why),
                            HttpError::HeadTooLarge => (431, "request head too large"),
                            HttpError::BodyTooLarge => (413, "request body too large"),
                        };
                        self.answer_and_close(io, i, status, "InvalidRequest", msg);
                        return Ok(());
                    }
                }
            }
            let c = self.conns[i].as_mut().expect("present");
            // Taken, not cloned (a clone per request was most of the allocations of
            // parsing it); put back while its body is still arriving.
            let head = c.head.take().expect("set above");
            let route = api::route(&head.method, &head.target);
            if c.relay.is_some() || is_streaming(&route, &head) {
                if !self.serve_stream(io, i, &route, &head)? {
                    if let Some(c) = self.conns[i].as_mut() {
                        c.head = Some(head);
                    }
                    return Ok(());
                }
                continue;
            }
            let max = match route {
                Route::Response(_) => api::RESPONSE_BYTES_MAX,
                _ => api::ERROR_BYTES_MAX,
            };
            let (decoder, body) = c
                .body
                .get_or_insert_with(|| (http::BodyStream::with_limit(head.body, max), Vec::new()));
            let fed = decoder.feed(&c.buf[c.pos..], body);
            match fed {
                Ok(used) => c.pos += used,
                Err(HttpError::BodyTooLarge) => {
                    self.too_large(io, i, &route, &head)?;
                    return Ok(());
                }
                Err(e) => {
                    let (status, msg) = match e {
                        HttpError::HeadTooLarge => (431, "trailer fields too large"),
                        HttpError::Bad(why) => (400, why),
                        HttpError::BodyTooLarge => unreachable!("matched above"),
                    };
                    self.answer_and_close(io, i, status, "InvalidRequest", msg);
                    return Ok(());
                }
            }
            if !decoder.is_done() {
                let expects_continue = head.expects_continue();
                c.head = Some(head);
                if self.bodies_in_flight() > BODY_BYTES_IN_FLIGHT_MAX {
                    let msg = format!(
                        "request bodies on this instance's connections exceed \
                         {BODY_BYTES_IN_FLIGHT_MAX} bytes"
                    );
                    self.answer_and_close(io, i, 413, "RequestEntityTooLarge", &msg);
                    return Ok(());
                }
                let c = self.conns[i].as_mut().expect("present");
                if expects_continue && !c.continue_sent {
                    c.continue_sent = true;
                    if !io.write(i, http::CONTINUE) {
                        self.closed(io, i);
                    }
                }
                return Ok(());
            }
            let (_, body) = c.body.take().expect("set above");
            if head.close {
                self.conns[i].as_mut().expect("present").closing = true;
            }
            self.handle(io, i, route, &head, body)?;
        }
        Ok(())
    }

    /// Bytes of request bodies decoded and waiting for their ends, all connections.
    fn bodies_in_flight(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter_map(|c| c.body.as_ref())
            .map(|(_, b)| b.len())
            .sum()
    }

    /// Relays the streamed response posted on connection `i` as far as its
    /// body has arrived; true once it is complete and answered.
    fn serve_stream(
        &mut self,
        io: &mut impl Io,
        i: ConnId,
        route: &Route,
        head: &Head,
    ) -> io::Result<bool> {
        let c = self.conns[i].as_mut().expect("present");
        let mut st = match c.relay.take() {
            Some(st) => st,
            None => {
                let Route::Response(id) = route else {
                    unreachable!("only responses stream")
                };
                let Some(inv) = self.current.as_ref().filter(|c| &c.request_id == id) else {
                    let (status, kind, msg) = match self.last_answered.as_deref() == Some(id) {
                        true => (
                            403,
                            "InvalidStateTransition",
                            "the invocation was already answered",
                        ),
                        false => (400, "InvalidRequestID", "Invalid request ID"),
                    };
                    // Its body is never read: the connection closes.
                    self.answer_and_close(io, i, status, kind, msg);
                    return Ok(false);
                };
                let content_type = head.header("content-type").map(str::to_string);
                let prelude = !inv.raw
                    && content_type
                        .as_deref()
                        .is_some_and(|t| t.eq_ignore_ascii_case(api::HTTP_INTEGRATION_TYPE));
                let st = StreamIn {
                    frame_id: inv.frame_id,
                    request_id: inv.request_id.clone(),
                    raw: inv.raw,
                    body: http::BodyStream::new(head.body),
                    content_type,
                    prelude: prelude.then(Vec::new),
                    head_sent: false,
                };
                if head.expects_continue() && !io.write(i, http::CONTINUE) {
                    self.closed(io, i);
                    return Ok(false);
                }
                st
            }
        };
        let c = self.conns[i].as_mut().expect("present");
        let mut data = Vec::new();
        let fed = st.body.feed(&c.buf[c.pos..], &mut data);
        c.pos += *fed.as_ref().unwrap_or(&0);
        if fed.is_err() {
            let meta = json!({"errorType": "Runtime.StreamError",
                "errorMessage": "the streamed response body is malformed"});
            self.end_stream(io, st, meta.to_string().as_bytes());
            self.answer_and_close(io, i, 400, "InvalidRequest", "malformed streamed body");
            return Ok(false);
        }
        let done = st.body.is_done();
        if let Err(why) = relay_stream(io, &mut st, data, done) {
            let meta = json!({"errorType": "Runtime.MalformedResponse", "errorMessage": why});
            self.end_stream(io, st, meta.to_string().as_bytes());
            self.answer_and_close(io, i, 400, "InvalidRequest", &why);
            return Ok(false);
        }
        if !done {
            self.conns[i].as_mut().expect("present").relay = Some(st);
            return Ok(false);
        }
        let meta = api::stream_end_meta(&st.body.trailers, st.raw);
        self.end_stream(io, st, &meta);
        let c = self.conns[i].as_mut().expect("present");
        c.head = None;
        c.closing |= head.close;
        self.reply(io, i, 202, br#"{"status":"OK"}"#);
        self.answered = Some(i);
        self.dispatch(io)?;
        Ok(true)
    }

    /// Ends streamed response `st` with STREAM_END `meta` (or, failed before
    /// its head went out, an ERROR); the invocation is answered.
    fn end_stream(&mut self, io: &mut impl Io, st: StreamIn, meta: &[u8]) {
        let kind = match st.head_sent {
            true => FrameType::StreamEnd,
            false if meta == b"{}" => {
                let head =
                    api::stream_head_meta(st.content_type.as_deref(), None).expect("a plain head");
                let _ = io.frame(FrameType::StreamHead, 0, st.frame_id, &head, &[]);
                FrameType::StreamEnd
            }
            false => FrameType::Error,
        };
        let _ = io.frame(kind, 0, st.frame_id, meta, &[]);
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.request_id == st.request_id)
        {
            self.current = None;
        }
        self.last_answered = Some(st.request_id);
    }

    /// A body over the limit: Lambda's 413; a response that big fails its invocation.
    fn too_large(
        &mut self,
        io: &mut impl Io,
        i: ConnId,
        route: &Route,
        head: &Head,
    ) -> io::Result<()> {
        let limit = match (route, head.body) {
            (Route::Response(_), _) => api::RESPONSE_BYTES_MAX,
            (_, BodyKind::Length(_) | BodyKind::Chunked) => api::ERROR_BYTES_MAX,
        };
        let msg = format!("Exceeded maximum allowed payload size ({limit} bytes).");
        if let Route::Response(id) = route {
            if self.current.as_ref().is_some_and(|c| &c.request_id == id) {
                let inv = self.current.take().expect("checked");
                let message = format!(
                    "Response payload size exceeded maximum allowed payload size ({limit} bytes)."
                );
                error_frame(io, inv.frame_id, "Function.ResponseSizeTooLarge", &message)?;
                self.last_answered = Some(inv.request_id);
            }
            self.answer_and_close(io, i, 413, "Function.ResponseSizeTooLarge", &msg);
        } else {
            self.answer_and_close(io, i, 413, "RequestEntityTooLarge", &msg);
        }
        Ok(())
    }

    fn handle(
        &mut self,
        io: &mut impl Io,
        i: ConnId,
        route: Route,
        head: &Head,
        body: Vec<u8>,
    ) -> io::Result<()> {
        match route {
            Route::Next => {
                if self.current.is_some() {
                    self.reply_error(
                        io,
                        i,
                        403,
                        "InvalidStateTransition",
                        "an invocation is in progress: post its response or error first",
                    );
                    return Ok(());
                }
                if self.state == State::Initialising {
                    self.init_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
                    self.state = State::Ready;
                    self.send_ready(io)?;
                }
                if let Some(old) = self.parked.replace(i) {
                    if old != i {
                        self.conns[old] = None;
                        io.close(old);
                    }
                }
                self.dispatch(io)
            }
            Route::Response(id) | Route::Error(id) => {
                let is_response = head.target.ends_with("/response");
                let Some(inv) = self.current.as_ref().filter(|c| c.request_id == id) else {
                    if self.last_answered.as_deref() == Some(id.as_str()) {
                        self.reply_error(
                            io,
                            i,
                            403,
                            "InvalidStateTransition",
                            "the invocation was already answered",
                        );
                    } else {
                        self.reply_error(io, i, 400, "InvalidRequestID", "Invalid request ID");
                    }
                    return Ok(());
                };
                let (frame_id, raw) = (inv.frame_id, inv.raw);
                if is_response {
                    let (kind, meta, out) = match api::translate_response(&body, raw) {
                        Ok((meta, out)) if meta.len() <= protocol::META_BYTES_MAX => {
                            (FrameType::Response, meta, out)
                        }
                        Ok(_) => {
                            let meta = json!({"errorType": "Runtime.MalformedResponse",
                                "errorMessage": "the response headers exceed the metadata limit"});
                            (FrameType::Error, meta.to_string().into_bytes(), Vec::new())
                        }
                        Err(why) => {
                            let meta = json!({"errorType": "Runtime.MalformedResponse",
                                "errorMessage": format!("cannot translate the handler result: {why}")});
                            (FrameType::Error, meta.to_string().into_bytes(), Vec::new())
                        }
                    };
                    io.frame(kind, 0, frame_id, &meta, &out)?;
                } else {
                    let header = head.header("lambda-runtime-function-error-type");
                    let meta = api::error_meta(&body, header, raw);
                    io.frame(FrameType::Error, 0, frame_id, &meta, &[])?;
                }
                self.current = None;
                self.last_answered = Some(id);
                self.reply(io, i, 202, br#"{"status":"OK"}"#);
                self.answered = Some(i);
                self.dispatch(io)
            }
            Route::InitError => {
                let header = head.header("lambda-runtime-function-error-type");
                let meta = api::error_meta(&body, header, false);
                if self.state == State::Initialising {
                    self.fail_init_meta(io, meta)?;
                    self.reply(io, i, 202, br#"{"status":"OK"}"#);
                } else {
                    self.reply_error(
                        io,
                        i,
                        403,
                        "InvalidStateTransition",
                        "init/error is only accepted during init",
                    );
                }
                Ok(())
            }
            Route::MethodNotAllowed => {
                self.reply_error(io, i, 405, "MethodNotAllowed", "method not allowed");
                Ok(())
            }
            Route::NotFound => {
                self.reply_error(io, i, 404, "NotFound", "no such Runtime API path");
                Ok(())
            }
        }
    }

    /// Hands the next queued invocation to the parked `/next`, if both exist.
    fn dispatch(&mut self, io: &mut impl Io) -> io::Result<()> {
        if self.current.is_some() || self.state != State::Ready {
            return Ok(());
        }
        let Some(i) = self.parked else { return Ok(()) };
        let Some((frame_id, meta, body)) = self.queue.pop_front() else {
            return Ok(());
        };
        let now = io.realtime_ms();
        let trace = self.trace_id(now);
        let f = self.function.as_ref().expect("ready implies HELLO");
        let inv = api::invocation(&meta, &body, frame_id, f, now, &trace);
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        headers.extend(inv.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let bytes = http::response(200, &headers, &inv.event);
        self.parked = None;
        self.current = Some(inv);
        if !io.write(i, &bytes) {
            // The runtime will not see this invocation: fail it now.
            let inv = self.current.take().expect("set above");
            let message = "the runtime's /next connection broke before the event was delivered";
            error_frame(io, inv.frame_id, "Runtime.InvalidState", message)?;
            self.closed(io, i);
            return Ok(());
        }
        if self.conns[i].as_ref().is_some_and(|c| c.closing) {
            // `/next` sent with `Connection: close`: closed once the event is written.
            self.closed(io, i);
            return Ok(());
        }
        // Requests pipelined behind /next are served now.
        self.serve_buffered(io, i)
    }

    fn reply(&mut self, io: &mut impl Io, i: ConnId, status: u16, body: &[u8]) {
        let Some(c) = self.conns[i].as_ref() else {
            return;
        };
        let bytes = http::response(status, &[("Content-Type", "application/json")], body);
        let closing = c.closing;
        if !io.write(i, &bytes) || closing {
            self.closed(io, i);
        }
    }

    fn reply_error(&mut self, io: &mut impl Io, i: ConnId, status: u16, kind: &str, msg: &str) {
        self.reply(io, i, status, &api::error_doc(kind, msg));
    }

    fn answer_and_close(
        &mut self,
        io: &mut impl Io,
        i: ConnId,
        status: u16,
        kind: &str,
        msg: &str,
    ) {
        if let Some(c) = self.conns[i].as_mut() {
            c.closing = true;
        }
        self.reply_error(io, i, status, kind, msg);
        if self.conns[i].is_some() {
            self.closed(io, i);
        }
    }
}

/// Sends the head of streamed response `st` (once known) and `data` as
/// STREAM_CHUNKs; `done`: the body ended. `Err` says why the stream cannot go on.
fn relay_stream(
    io: &mut impl Io,
    st: &mut StreamIn,
    mut data: Vec<u8>,
    done: bool,
) -> Result<(), String> {
    let host = |e: io::Error| format!("writing to the host: {e}");
    if let Some(p) = st.prelude.as_mut() {
        // Searched from where the previous piece ended, so a prelude sent a
        // byte at a time is not searched once per byte.
        let from = p.len().saturating_sub(api::PRELUDE_END.len() - 1);
        p.append(&mut data);
        let end = p[from..]
            .windows(api::PRELUDE_END.len())
            .position(|w| w == api::PRELUDE_END)
            .map(|at| from + at);
        match end {
            Some(at) => {
                let meta = api::stream_head_meta(None, Some(&p[..at]))?;
                data = p.split_off(at + api::PRELUDE_END.len());
                st.prelude = None;
                io.frame(FrameType::StreamHead, 0, st.frame_id, &meta, &[])
                    .map_err(host)?;
                st.head_sent = true;
            }
            None if p.len() > api::PRELUDE_BYTES_MAX => {
                return Err(format!(
                    "no end of the HTTP prelude in its first {} bytes",
                    api::PRELUDE_BYTES_MAX
                ));
            }
            // A body that ended inside the prelude is sent as it is.
            None if done => data = st.prelude.take().expect("present"),
            None => return Ok(()),
        }
    }
    if !st.head_sent {
        let meta = api::stream_head_meta(st.content_type.as_deref(), None)?;
        io.frame(FrameType::StreamHead, 0, st.frame_id, &meta, &[])
            .map_err(host)?;
        st.head_sent = true;
    }
    for piece in data.chunks(protocol::STREAM_CHUNK_BYTES_MAX) {
        io.frame(FrameType::StreamChunk, 0, st.frame_id, &[], piece)
            .map_err(host)?;
    }
    Ok(())
}

/// Whether `head` posts a response in streaming mode.
fn is_streaming(route: &Route, head: &Head) -> bool {
    matches!(route, Route::Response(_))
        && head
            .header("lambda-runtime-function-response-mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("streaming"))
}

/// Fails invocation `frame_id` with an ERROR frame of Lambda's shape.
fn error_frame(io: &mut impl Io, frame_id: u32, error_type: &str, message: &str) -> io::Result<()> {
    let meta = json!({"errorType": error_type, "errorMessage": message});
    io.frame(
        FrameType::Error,
        0,
        frame_id,
        meta.to_string().as_bytes(),
        &[],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the session does.
    #[derive(Default)]
    struct Fake {
        frames: Vec<(FrameType, u32, String, Vec<u8>)>,
        written: Vec<(ConnId, String)>,
        closed: Vec<ConnId>,
        spawned: Vec<Vec<String>>,
        broken: Option<ConnId>,
        /// Bytes written and not yet "sent", when a test models a slow reader.
        unsent: usize,
        count_unsent: bool,
    }

    impl Io for Fake {
        fn frame(
            &mut self,
            kind: FrameType,
            _flags: u8,
            id: u32,
            meta: &[u8],
            body: &[u8],
        ) -> io::Result<()> {
            let meta = String::from_utf8_lossy(meta).into_owned();
            self.frames.push((kind, id, meta, body.to_vec()));
            Ok(())
        }
        fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
            if self.broken == Some(conn) {
                return false;
            }
            let text = String::from_utf8_lossy(bytes).into_owned();
            self.written.push((conn, text));
            if self.count_unsent {
                self.unsent += bytes.len();
            }
            true
        }
        fn backlog(&self, _conn: ConnId) -> usize {
            self.unsent
        }
        fn close(&mut self, conn: ConnId) {
            self.closed.push(conn);
        }
        fn spawn(&mut self, _kind: Kind, _f: &Function, argv: &[String]) -> io::Result<()> {
            self.spawned.push(argv.to_vec());
            Ok(())
        }
        fn realtime_ms(&self) -> u64 {
            1_764_466_718_123
        }
    }

    impl Fake {
        fn kinds(&self) -> Vec<FrameType> {
            self.frames.iter().map(|f| f.0).collect()
        }
        /// The status of the last answer on `conn`.
        fn status(&self, conn: ConnId) -> u16 {
            let (_, text) = self
                .written
                .iter()
                .rev()
                .find(|(c, _)| *c == conn)
                .expect("an answer");
            text[9..12].parse().expect("a status")
        }
    }

    fn hello(s: &mut Session, io: &mut Fake) {
        let meta = br#"{"function":"f1","handler":"app.handler","timeout_ms":3000}"#;
        s.on_frame(io, FrameType::Hello, 0, meta, Vec::new())
            .unwrap();
    }

    fn request(s: &mut Session, io: &mut Fake, i: ConnId, bytes: &str) -> bool {
        s.received(i, bytes.as_bytes());
        s.serve(io, i).unwrap()
    }

    fn invoke(s: &mut Session, io: &mut Fake, id: u32, body: &str) {
        let meta = format!(r#"{{"raw":true,"request_id":"req-{id}"}}"#);
        s.on_frame(
            io,
            FrameType::Invoke,
            id,
            meta.as_bytes(),
            body.as_bytes().to_vec(),
        )
        .unwrap();
    }

    const NEXT: &str = "GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n";

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST /2018-06-01/runtime/{path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn next_is_long_polled_and_answers_relay_as_frames() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        assert_eq!(io.spawned, vec![vec!["/var/task/bootstrap".to_string()]]);
        // An INVOKE before the first /next waits in the queue; /next makes READY.
        invoke(&mut s, &mut io, 5, r#"{"a":1}"#);
        let c = s.open().unwrap();
        assert!(!request(&mut s, &mut io, c, NEXT));
        assert_eq!(io.kinds(), vec![FrameType::Ready]);
        let (_, event) = io.written.last().unwrap();
        assert!(event.starts_with("HTTP/1.1 200"));
        for h in [
            "Lambda-Runtime-Aws-Request-Id: req-5",
            "Lambda-Runtime-Deadline-Ms: 1764466721123",
            "Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:f1",
            "Lambda-Runtime-Trace-Id: Root=1-",
        ] {
            assert!(event.contains(h), "{h} in {event}");
        }
        assert!(event.ends_with(r#"{"a":1}"#));
        assert_eq!(s.log_tag(), 5);
        // A second /next while it runs is refused; the answer goes out as RESPONSE.
        let d = s.open().unwrap();
        request(&mut s, &mut io, d, NEXT);
        assert_eq!(io.status(d), 403);
        assert!(request(
            &mut s,
            &mut io,
            c,
            &post("invocation/req-5/response", "\"hi\"")
        ));
        assert_eq!(io.status(c), 202);
        let (kind, id, _, body) = io.frames.last().unwrap();
        assert_eq!(
            (*kind, *id, body.as_slice()),
            (FrameType::Response, 5, &b"\"hi\""[..])
        );
        assert_eq!(s.log_tag(), 0);
        // A second answer is a 403, an unknown id a 400, an unknown path a 404.
        request(&mut s, &mut io, c, &post("invocation/req-5/response", "1"));
        assert_eq!(io.status(c), 403);
        request(&mut s, &mut io, c, &post("invocation/nope/error", "{}"));
        assert_eq!(io.status(c), 400);
        request(&mut s, &mut io, c, &post("whatever", ""));
        assert_eq!(io.status(c), 404);
        // The next /next parks; an INVOKE then goes straight to it.
        request(&mut s, &mut io, c, NEXT);
        let answers = io.written.len();
        invoke(&mut s, &mut io, 6, "2");
        assert_eq!(io.written.len(), answers + 1);
        request(
            &mut s,
            &mut io,
            c,
            &(post(
                "invocation/req-6/error",
                r#"{"errorMessage":"no","errorType":"E"}"#,
            )),
        );
        let (kind, id, meta, _) = io.frames.last().unwrap();
        assert_eq!((*kind, *id), (FrameType::Error, 6));
        assert!(meta.contains(r#""errorType":"E""#), "{meta}");
        assert!(io.closed.is_empty());
    }

    #[test]
    fn oversized_responses_fail_the_invocation_with_413() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        invoke(&mut s, &mut io, 9, "1");
        let head = format!(
            "POST /2018-06-01/runtime/invocation/req-9/response HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            api::RESPONSE_BYTES_MAX + 1
        );
        request(&mut s, &mut io, c, &head);
        assert_eq!(io.status(c), 413);
        assert!(io
            .written
            .last()
            .unwrap()
            .1
            .contains("Function.ResponseSizeTooLarge"));
        let (kind, id, meta, _) = io.frames.last().unwrap();
        assert_eq!((*kind, *id), (FrameType::Error, 9));
        assert!(meta.contains("Function.ResponseSizeTooLarge"));
        assert_eq!(io.closed, vec![c]);
        // The instance stays usable on a new connection.
        let d = s.open().unwrap();
        assert_eq!(d, c, "the slot is reused");
        request(&mut s, &mut io, d, NEXT);
        invoke(&mut s, &mut io, 10, "2");
        assert!(io.written.last().unwrap().1.contains("req-10"));
    }

    #[test]
    fn init_errors_and_exits_are_reported_as_lambda_does() {
        let (mut s, mut io) = (Session::new(Kind::Python3, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(
            &mut s,
            &mut io,
            c,
            &post("init/error", r#"{"errorMessage":"bad","errorType":"Init"}"#),
        );
        assert_eq!(io.status(c), 202);
        assert_eq!(io.kinds(), vec![FrameType::Log, FrameType::InitError]);
        // Invocations after a failed init fail with its error; so does a HELLO.
        invoke(&mut s, &mut io, 3, "1");
        assert_eq!(io.frames.last().unwrap().0, FrameType::Error);
        hello(&mut s, &mut io);
        assert_eq!(io.frames.last().unwrap().0, FrameType::InitError);

        // Exiting mid-invocation fails it with Runtime.ExitError.
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        invoke(&mut s, &mut io, 4, "1");
        s.on_exit(&mut io, "Runtime exited with error: exit status 3")
            .unwrap();
        let (kind, id, meta, _) = io.frames.last().unwrap();
        assert_eq!((*kind, *id), (FrameType::Error, 4));
        assert!(meta.contains("Runtime.ExitError") && meta.contains("RequestId: req-4"));
    }

    #[test]
    fn streamed_responses_relay_as_they_arrive() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        invoke(&mut s, &mut io, 2, "1");
        let head = "POST /2018-06-01/runtime/invocation/req-2/response HTTP/1.1\r\n\
            Lambda-Runtime-Function-Response-Mode: streaming\r\n\
            Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n";
        request(&mut s, &mut io, c, &format!("{head}5\r\nhello\r\n"));
        assert_eq!(
            io.kinds()[1..],
            [FrameType::StreamHead, FrameType::StreamChunk]
        );
        assert_eq!(io.frames.last().unwrap().3, b"hello");
        // The connection breaking mid-stream ends it with an error.
        s.closed(&mut io, c);
        let (kind, id, meta, _) = io.frames.last().unwrap();
        assert_eq!((*kind, *id), (FrameType::StreamEnd, 2));
        assert!(meta.contains("Runtime.StreamError"), "{meta}");
    }

    #[test]
    fn connections_are_bounded_and_broken_deliveries_fail() {
        let mut s = Session::new(Kind::Provided, 7);
        let open: Vec<ConnId> = (0..CONNS_MAX).map_while(|_| s.open()).collect();
        assert_eq!(open.len(), CONNS_MAX);
        assert_eq!(s.open(), None);
        let mut io = Fake::default();
        s.closed(&mut io, 3);
        assert_eq!(s.open(), Some(3));

        // A /next connection that breaks as the event is written fails the invocation.
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        io.broken = Some(c);
        invoke(&mut s, &mut io, 8, "1");
        let (kind, id, meta, _) = io.frames.last().unwrap();
        assert_eq!((*kind, *id), (FrameType::Error, 8));
        assert!(meta.contains("Runtime.InvalidState"));
        assert_eq!(io.closed, vec![c]);
    }

    #[test]
    fn bytes_sent_into_a_parked_next_are_bounded() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        // Parked: nothing more is read from it, so what follows only piles up.
        let junk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while !io.closed.contains(&c) {
            s.received(c, &junk);
            s.serve(&mut io, c).unwrap();
            sent += junk.len();
            assert!(
                sent <= UNREAD_BYTES_MAX + junk.len(),
                "still open after {sent} bytes"
            );
        }
        assert_eq!(io.status(c), 413);
        // The instance goes on: a new /next parks and gets the next invocation.
        let d = s.open().unwrap();
        request(&mut s, &mut io, d, NEXT);
        invoke(&mut s, &mut io, 3, "{}");
        assert!(io.written.last().unwrap().1.contains("req-3"));
    }

    #[test]
    fn requests_wait_while_their_answers_are_unsent() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        io.count_unsent = true;
        let c = s.open().unwrap();
        let one = "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n";
        let n = 5_000;
        // Sent in pieces that cut requests anywhere, never reading an answer.
        let wire = one.repeat(n).into_bytes();
        for piece in wire.chunks(7_001) {
            s.received(c, piece);
            s.serve(&mut io, c).unwrap();
            assert!(io.unsent <= BACKLOG_BYTES_MAX + 256, "{} unsent", io.unsent);
        }
        assert!(
            io.written.len() < n,
            "every request was answered into a full backlog"
        );
        assert!(
            !io.closed.contains(&c),
            "the requests are held, not refused"
        );
        // The runtime reads: the rest is served, each request once (the
        // engine serves again after a flush only while something is unread).
        while io.written.len() < n {
            assert!(s.has_unread(c), "requests held but none unread");
            let before = io.written.len();
            io.unsent = 0;
            s.serve(&mut io, c).unwrap();
            assert!(io.written.len() > before, "stuck at {before}");
        }
        assert_eq!(io.written.len(), n);
        assert!(!s.has_unread(c), "all served, yet something unread");
        assert!(io
            .written
            .iter()
            .all(|(_, a)| a.starts_with("HTTP/1.1 404")));
    }

    #[test]
    fn posted_bodies_decode_whole_however_they_arrive() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        invoke(&mut s, &mut io, 4, "{}");
        // A chunked response in one-byte chunks, delivered a byte at a time.
        let body = "\"a chunked answer\"";
        let mut wire = String::from(
            "POST /2018-06-01/runtime/invocation/req-4/response HTTP/1.1\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
        );
        for ch in body.chars() {
            wire.push_str(&format!("1\r\n{ch}\r\n"));
        }
        wire.push_str("0\r\nX-Trailer: t\r\n\r\n");
        for b in wire.as_bytes() {
            s.received(c, std::slice::from_ref(b));
            s.serve(&mut io, c).unwrap();
        }
        assert_eq!(io.status(c), 202);
        let (kind, id, _, got) = io.frames.last().unwrap();
        assert_eq!(
            (*kind, *id, got.as_slice()),
            (FrameType::Response, 4, body.as_bytes())
        );
    }

    #[test]
    fn endless_trailers_and_bodies_on_every_connection_are_refused() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        let c = s.open().unwrap();
        request(&mut s, &mut io, c, NEXT);
        invoke(&mut s, &mut io, 4, "{}");
        let head = "POST /2018-06-01/runtime/invocation/req-4/response HTTP/1.1\r\n\
                    Transfer-Encoding: chunked\r\n\r\n0\r\n";
        request(&mut s, &mut io, c, head);
        let trailer = "x:y\r\n".repeat(1000);
        while !io.closed.contains(&c) {
            request(&mut s, &mut io, c, &trailer);
        }
        assert_eq!(io.status(c), 431);
        // Bodies arriving on several connections at once: the budget holds one
        // whole response, so the two that would take it over are refused and
        // the first completes.
        io.closed.clear();
        let big = api::RESPONSE_BYTES_MAX;
        let head = format!(
            "POST /2018-06-01/runtime/invocation/req-4/response HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"
        );
        let part = vec![b'x'; 1 << 20];
        let conns: Vec<ConnId> = (0..3).map(|_| s.open().unwrap()).collect();
        for &k in &conns {
            request(&mut s, &mut io, k, &head);
        }
        for _ in 0..big / part.len() {
            for &k in &conns {
                if !io.closed.contains(&k) {
                    s.received(k, &part);
                    s.serve(&mut io, k).unwrap();
                }
            }
        }
        assert_eq!(io.closed, conns[1..], "refused in turn as each went over");
        assert!(io
            .written
            .iter()
            .any(|(k, a)| *k == conns[1] && a.starts_with("HTTP/1.1 413")));
        assert!(io
            .written
            .iter()
            .any(|(k, a)| *k == conns[2] && a.starts_with("HTTP/1.1 413")));
        assert_eq!(io.status(conns[0]), 202);
        let (kind, id, _, got) = io.frames.last().unwrap();
        assert_eq!((*kind, *id, got.len()), (FrameType::Response, 4, big));
    }

    #[test]
    fn a_next_that_asks_to_close_is_closed_after_its_event() {
        let (mut s, mut io) = (Session::new(Kind::Provided, 7), Fake::default());
        hello(&mut s, &mut io);
        invoke(&mut s, &mut io, 9, "{}");
        let c = s.open().unwrap();
        let next = NEXT.replace("Host: x", "Host: x\r\nConnection: close");
        request(&mut s, &mut io, c, &next);
        assert!(io.written.last().unwrap().1.contains("req-9"));
        assert_eq!(io.closed, vec![c]);
    }
}
