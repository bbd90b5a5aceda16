//! One HTTP/1.1 client connection: reading requests, answering them in order.
//!
//! A connection handles one request at a time: while a request waits for a
//! function or the control plane, later pipelined requests stay unparsed in the
//! read buffer, which keeps responses in request order without reordering.

use crate::control::auth::{Admitted, Scope};
use std::net::IpAddr;
use std::time::Instant;

use crate::engine::peers::PeerTable;
use crate::engine::phases::Track;
use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::{Token, Worker};
use crate::functions::sched::Served;
use crate::http::parse::{self, BodyDecoder, BodyFraming, Error as ParseError, Request};
use crate::http::reply::Reply;
pub use crate::http::reply::ReplyTo;
use crate::http::response::{self, Persistence};
use crate::metrics::add;

/// Read state of a connection.
pub enum ConnState {
    /// Between requests (nothing of the next one read yet).
    Idle,
    /// Part of a head has arrived.
    Head,
    /// Reading a body that started arriving at `started`; `charged`: it
    /// counts against the core's input budget ([`Conn::in_charge`]).
    Body {
        req: Box<Request>,
        decoder: BodyDecoder,
        body: Vec<u8>,
        started: Instant,
        charged: bool,
    },
    /// A request was handed off; its answer has not been written yet.
    /// `announce_keep_alive`: an HTTP/1.0 client asked for keep-alive and only
    /// keeps the connection if the answer says `Connection: keep-alive`.
    /// `invoke`: the request went to this core's scheduler (which is told if
    /// the client leaves before the answer).
    /// `chunked_ok`: the client speaks HTTP/1.1, so a streamed answer may be
    /// chunked. `stream`: the answer is being streamed (its head is written).
    Waiting {
        head_only: bool,
        keep_alive: bool,
        announce_keep_alive: bool,
        invoke: bool,
        chunked_ok: bool,
        stream: Option<crate::engine::streamed::StreamOut>,
    },
}

/// Per-connection HTTP state.
pub struct Conn {
    pub serial: u64,
    pub peer: IpAddr,
    pub state: ConnState,
    /// When the current wait ends: keep-alive idle, head or body read deadline.
    pub deadline: Instant,
    /// The current request's phase timings.
    pub phases: Track,
    /// The request that takes this connection to another core (see
    /// [`crate::engine::relocate`]).
    pub moving: Option<Box<crate::engine::relocate::Moving>>,
    /// Bytes of the current request's body charged to the core's input budget
    /// ([`Worker::in_held`]) until it is answered or the connection goes: the
    /// memory allocated for it so far (see [`BODY_FIRST_ALLOC`]).
    pub in_charge: usize,
    /// The kernel's unacknowledged bytes when the keep-alive deadline last
    /// passed with an answer still going out (see [`Worker::expire_clients`]).
    pub unacked_seen: usize,
}

impl Worker {
    /// Reads and answers as many requests as the buffered input allows.
    pub fn process_client(&mut self, tok: Token) {
        loop {
            let Some(stream) = self.streams.get_mut(tok) else {
                return;
            };
            if stream.closing || stream.dead {
                return;
            }
            let out_pending = stream.out_pending();
            let Kind::Client(conn) = &mut stream.kind else {
                return;
            };
            match &mut conn.state {
                ConnState::Waiting { .. } => {
                    self.apply_backpressure(tok);
                    return;
                }
                ConnState::Idle | ConnState::Head => {
                    if stream.rpos == stream.rbuf.len() {
                        if matches!(conn.state, ConnState::Head) {
                            return;
                        }
                        conn.deadline = self.now + self.shared.cfg.http.keepalive_timeout;
                        self.apply_backpressure(tok);
                        return;
                    }
                    // Pipelined requests are not parsed while answers pile up, on this
                    // connection or on the core: a client that sends but never reads
                    // holds at most one answer beyond its bound.
                    if out_pending > self.shared.cfg.http.out_bytes_max {
                        self.apply_backpressure(tok);
                        return;
                    }
                    // Over the core's budget, connections that hold unsent answers
                    // wait; the others go on, so health checks and well-behaved
                    // clients are still served (see `Worker::evict_stalled`).
                    if self.out_queued > self.out_budget && out_pending > 0 {
                        stream.read_paused = true;
                        if !stream.budget_wait {
                            stream.budget_wait = true;
                            add(&self.metrics.budget_waits, 1);
                            self.budget_paused.push(tok);
                        }
                        self.mark(tok);
                        return;
                    }
                    if matches!(conn.state, ConnState::Idle) {
                        conn.phases.head(self.now);
                    }
                    let parsed = parse::parse_head(&stream.rbuf[stream.rpos..], &self.parse_limits);
                    match parsed {
                        Ok(None) => {
                            if matches!(conn.state, ConnState::Idle) {
                                conn.state = ConnState::Head;
                                conn.deadline = self.now + self.shared.cfg.http.head_timeout;
                            }
                            return;
                        }
                        Err(e) => return self.reject(tok, e),
                        Ok(Some((req, n))) => {
                            consume(&mut stream.rbuf, &mut stream.rpos, n);
                            // Authorised on the head: a refused client never gets
                            // `100 Continue` nor has its body buffered.
                            let scope = guarded_scope(&req);
                            let admitted = match scope {
                                Some(scope) => match self.shared.guard.check(scope, &req) {
                                    Ok(a) => a,
                                    Err(d) => {
                                        conn.state = waiting_on(&req);
                                        return self.deny(tok, &req, d);
                                    }
                                },
                                None => Admitted::Pending,
                            };
                            let limits = parse::Limits {
                                body_bytes_max: body_limit(&self.shared.cfg.http, &req, scope),
                                ..self.parse_limits
                            };
                            if req.body == BodyFraming::None {
                                conn.state = waiting_on(&req);
                                conn.phases
                                    .dispatched(self.now, req.timing, &self.metrics.phases);
                                self.dispatch(tok, req, Vec::new());
                                continue;
                            }
                            let decoder = match BodyDecoder::new(req.body, &limits) {
                                Ok(d) => d,
                                Err(e) => return self.reject(tok, e),
                            };
                            // The body of a client the head did not prove counts
                            // against the core's input budget as it is allocated; one
                            // whose length already shows it cannot fit is refused
                            // before a byte of it is read. Nothing is reserved on the
                            // head, so heads alone hold no budget.
                            let charged = admitted == Admitted::Pending;
                            let length = match req.body {
                                BodyFraming::Length(n) => n as usize,
                                _ => 0,
                            };
                            if charged
                                && !(fits_input(self.in_held, self.in_budget, length)
                                    && self.shared.peers.charge_input(conn.peer, 0, length))
                            {
                                conn.state = waiting_on(&req);
                                return self.refuse_body(tok, &req);
                            }
                            // The address was charged the whole length to see that it
                            // fits; from here both charges follow the allocation.
                            let body = Vec::with_capacity(length.min(BODY_FIRST_ALLOC));
                            if charged {
                                self.shared
                                    .peers
                                    .charge_input(conn.peer, length, body.capacity());
                                conn.in_charge = body.capacity();
                                self.in_held += conn.in_charge;
                            }
                            if req.expect_continue {
                                stream
                                    .wbuf
                                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                                self.mark(tok);
                            }
                            let Some(Kind::Client(conn)) =
                                self.streams.get_mut(tok).map(|s| &mut s.kind)
                            else {
                                return;
                            };
                            conn.state = ConnState::Body {
                                req: Box::new(req),
                                decoder,
                                body,
                                started: self.now,
                                charged,
                            };
                            conn.deadline = self.now + self.shared.cfg.http.head_timeout;
                        }
                    }
                }
                ConnState::Body {
                    req,
                    decoder,
                    body,
                    started,
                    charged,
                } => {
                    let input = &stream.rbuf[stream.rpos..];
                    // A `Content-Length: 0` body is complete before any byte arrives.
                    if input.is_empty() && !decoder.is_done() {
                        return;
                    }
                    // A body of known length grows by doubling but never past its
                    // length, so what is allocated stays within 2x of what arrived
                    // and ends at exactly the length.
                    if let BodyFraming::Length(n) = req.body {
                        let rest = (n as usize).saturating_sub(body.len());
                        let incoming = input.len().min(rest);
                        if incoming > body.capacity() - body.len() {
                            body.reserve_exact(body.capacity().max(incoming).min(rest));
                        }
                    }
                    let (n, done) = match decoder.feed(input, body) {
                        Ok(r) => r,
                        Err(e) => return self.reject(tok, e),
                    };
                    consume(&mut stream.rbuf, &mut stream.rpos, n);
                    // The charge follows the allocation.
                    if *charged && body.capacity() > conn.in_charge {
                        let others = self.in_held.saturating_sub(conn.in_charge);
                        if !(fits_input(others, self.in_budget, body.capacity())
                            && self.shared.peers.charge_input(
                                conn.peer,
                                conn.in_charge,
                                body.capacity(),
                            ))
                        {
                            let ConnState::Body { req, .. } =
                                std::mem::replace(&mut conn.state, ConnState::Idle)
                            else {
                                unreachable!()
                            };
                            conn.state = waiting_on(&req);
                            return self.refuse_body(tok, &req);
                        }
                        self.in_held = others + body.capacity();
                        conn.in_charge = body.capacity();
                    }
                    conn.deadline =
                        body_deadline(&self.shared.cfg.http, *started, body.len(), self.now);
                    if !done {
                        return;
                    }
                    let ConnState::Body { req, body, .. } =
                        std::mem::replace(&mut conn.state, ConnState::Idle)
                    else {
                        unreachable!()
                    };
                    conn.state = waiting_on(&req);
                    conn.phases
                        .dispatched(self.now, req.timing, &self.metrics.phases);
                    self.dispatch(tok, *req, body);
                }
            }
        }
    }

    /// Stops reading from a connection that has a request in flight and a full
    /// input buffer, or too much unsent output; resumes otherwise.
    fn apply_backpressure(&mut self, tok: Token) {
        let head_max = self.parse_limits.head_bytes_max;
        let out_max = self.shared.cfg.http.out_bytes_max;
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        let waiting = matches!(
            &s.kind,
            Kind::Client(Conn {
                state: ConnState::Waiting { .. },
                ..
            })
        );
        let pause = (waiting && s.input().len() >= head_max) || s.out_pending() > out_max;
        if pause != s.read_paused {
            s.read_paused = pause;
            self.mark(tok);
        }
    }

    /// Refuses a guarded request on its head. Its body (if any) is never read,
    /// so the connection closes after the answer.
    fn deny(&mut self, tok: Token, req: &Request, d: crate::control::auth::Denial) {
        let mut r = match guarded_scope(req) {
            Some(Scope::Service) => {
                crate::control::lambda::lambda_error(d.status, d.code, &d.message)
            }
            _ => Reply::error(d.status, d.code, &d.message),
        };
        if d.status == 401 {
            r = r.with_header("www-authenticate", "Bearer");
        }
        r.close = req.body != BodyFraming::None;
        self.answer(tok, &r, req.method == "HEAD");
    }

    /// Refuses a request whose body does not fit the core's input budget (503,
    /// retry in a second); the rest of the body is not read, so the connection
    /// closes after the answer.
    fn refuse_body(&mut self, tok: Token, req: &Request) {
        add(&self.metrics.shed_input, 1);
        let message = "the server holds too many request bodies at the moment; retry later";
        let r = match guarded_scope(req) {
            Some(Scope::Service) => {
                crate::control::lambda::lambda_error(503, "ServiceException", message)
            }
            _ => Reply::error(503, "too_many_request_bodies", message),
        };
        let r = r.with_header("retry-after", "1").closing();
        self.answer(tok, &r, req.method == "HEAD");
    }

    /// Answers a request that could not be parsed and closes the connection.
    fn reject(&mut self, tok: Token, e: ParseError) {
        add(&self.metrics.parse_errors, 1);
        let r = Reply::error(e.status(), error_code(&e), e.message()).closing();
        self.answer(tok, &r, false);
    }

    /// Writes the answer to the request a connection is waiting on (or to a
    /// rejected one), then continues with pipelined input.
    pub fn answer(&mut self, tok: Token, r: &Reply, head_only: bool) {
        self.answer_served(tok, r, head_only, None);
    }

    /// [`Worker::answer`] for an answer an instance gave (`served`, for the
    /// phase timings).
    fn answer_served(&mut self, tok: Token, r: &Reply, head_only: bool, served: Option<Served>) {
        let date = &self.date;
        let Some(stream) = self.streams.get_mut(tok) else {
            return;
        };
        let Kind::Client(conn) = &mut stream.kind else {
            return;
        };
        let (keep_alive, announce) = match conn.state {
            ConnState::Waiting {
                keep_alive,
                announce_keep_alive,
                ..
            } => (keep_alive && !r.close, announce_keep_alive),
            _ => (false, false),
        };
        let keep_alive = keep_alive && !self.draining;
        let timed;
        let r = match conn.phases.answered(self.now, served, &self.metrics.phases) {
            None => r,
            Some(value) => {
                timed = r.clone().with_owned_header("server-timing", value);
                &timed
            }
        };
        let persistence = match (keep_alive, announce) {
            (false, _) => Persistence::Close,
            (true, true) => Persistence::AnnounceKeepAlive,
            (true, false) => Persistence::KeepAlive,
        };
        let before = stream.wbuf.len();
        response::write(&mut stream.wbuf, date, r, persistence, head_only);
        let written = stream.wbuf.len() - before;
        if stream.out_counted == 0 {
            stream.out_progress = Some(self.now);
        }
        stream.out_counted += written;
        self.out_queued += written;
        add(&self.metrics.bytes_out, written as u64);
        self.metrics.count_status(r.status);
        release_input(&mut self.in_held, &self.shared.peers, conn);
        conn.state = ConnState::Idle;
        conn.deadline = self.now + self.shared.cfg.http.keepalive_timeout;
        if !keep_alive {
            stream.closing = true;
        }
        self.mark(tok);
    }

    /// Delivers an asynchronous answer if the connection that asked is still
    /// there; `served`: how an instance served it.
    pub fn answer_async(&mut self, to: ReplyTo, r: &Reply, served: Option<Served>) {
        let head_only = match self.streams.get(to.token) {
            Some(Stream {
                kind: Kind::Client(c),
                dead: false,
                ..
            }) if c.serial == to.serial => match c.state {
                // A streamed answer is ended by the scheduler, never replaced.
                ConnState::Waiting {
                    head_only,
                    stream: None,
                    ..
                } => head_only,
                _ => return,
            },
            _ => return,
        };
        self.answer_served(to.token, r, head_only, served);
        self.process_client(to.token);
    }

    /// Closes connections whose deadline passed: 408 where a request was partly read.
    pub fn expire_clients(&mut self) {
        let now = self.now;
        let keepalive = self.shared.cfg.http.keepalive_timeout;
        let due: Vec<(Token, bool)> = self
            .streams
            .iter()
            .filter_map(|(t, s)| match &s.kind {
                Kind::Client(c) if !s.dead && c.deadline <= now => match c.state {
                    ConnState::Waiting { .. } => None,
                    ConnState::Idle => Some((t, false)),
                    ConnState::Head | ConnState::Body { .. } => Some((t, true)),
                },
                _ => None,
            })
            .collect();
        // An answer still being written is no idle connection: it stays while
        // the client takes some of it within each keep-alive timeout (as
        // nginx's `send_timeout`), whether the rest waits here or in the
        // kernel (closing a socket whose peer reads slowly would lose what
        // the kernel still holds); a client that stops reading is closed then,
        // or sooner by the output budget (`Worker::evict_stalled`).
        let mut expired = Vec::with_capacity(due.len());
        for (tok, partial) in due {
            let s = &mut self.streams[tok];
            if !partial {
                let moving_here =
                    s.out_pending() > 0 && s.out_progress.is_some_and(|p| p + keepalive > now);
                let queued = crate::util::sock::unacked_bytes(s.raw());
                let Kind::Client(c) = &mut s.kind else {
                    unreachable!("filtered above")
                };
                let moving_there = queued > 0 && queued != c.unacked_seen;
                c.unacked_seen = queued;
                if moving_here || moving_there {
                    c.deadline = now + keepalive;
                    continue;
                }
            }
            expired.push((tok, partial));
        }
        for (tok, partial) in expired {
            if partial {
                let r = Reply::error(
                    408,
                    "request_timeout",
                    "the request was not received in time",
                )
                .closing();
                add(&self.metrics.parse_errors, 1);
                self.answer(tok, &r, false);
            } else {
                self.close_stream(tok);
            }
        }
    }
}

/// What guards `req`'s route: the control plane and `/metrics` need the admin
/// token (or the metrics token); invocations and `/healthz` are public.
fn guarded_scope(req: &Request) -> Option<Scope> {
    use crate::routes::Route;
    match crate::routes::route(&req.method, req.path()) {
        Route::Deploy
        | Route::ListFunctions
        | Route::GetFunction(_)
        | Route::DeleteFunction(_)
        | Route::Logs(_)
        | Route::AsyncFailed(_) => Some(Scope::Control),
        Route::Lambda(_) => Some(Scope::Service),
        Route::Metrics => Some(Scope::Metrics),
        _ => None,
    }
}

/// The largest body `req` may carry: a deploy's zip on `/deploy`; through the
/// service API a zip base64-encoded in JSON for CreateFunction and
/// UpdateFunctionCode, an invocation's payload for Invoke, and
/// [`SERVICE_SMALL_BODY_MAX`] for the rest; the invocation limit otherwise.
fn body_limit(http: &crate::config::HttpLimits, req: &Request, scope: Option<Scope>) -> u64 {
    use crate::routes::{LambdaOp, Route};
    match scope {
        Some(Scope::Control) if req.path() == "/deploy" => http.deploy_body_bytes_max,
        Some(Scope::Service) => match crate::routes::route(&req.method, req.path()) {
            Route::Lambda(LambdaOp::Create | LambdaOp::UpdateCode(_)) => {
                http.deploy_body_bytes_max / 3 * 4 + 64 * 1024
            }
            Route::Lambda(LambdaOp::Invoke(_) | LambdaOp::InvokeStream(_)) => http.body_bytes_max,
            _ => SERVICE_SMALL_BODY_MAX,
        },
        _ => http.body_bytes_max,
    }
}

/// Whether a body of `total` bytes fits a core whose other connections hold
/// `others` of its `budget`. An empty body always does; one larger than the
/// whole budget still gets in when the core holds no other, so a small budget
/// slows large uploads without barring them.
fn fits_input(others: usize, budget: usize, total: usize) -> bool {
    total == 0 || others == 0 || others.saturating_add(total) <= budget
}

/// Gives back the input budget a connection's body holds, on the core
/// (`in_held`) and for its address.
pub(crate) fn release_input(in_held: &mut usize, peers: &PeerTable, conn: &mut Conn) {
    let n = std::mem::take(&mut conn.in_charge);
    *in_held = in_held.saturating_sub(n);
    peers.release_input(conn.peer, n);
}

/// The first allocation for a body; it grows as bytes arrive (see the
/// `ConnState::Body` arm of [`Worker::process_client`]), so a head that
/// announces a large body and sends nothing costs little.
const BODY_FIRST_ALLOC: usize = 64 * 1024;

/// Bodies of the Lambda service API's operations other than those that carry
/// code or an invocation's payload (aliases, versions, configuration, event
/// settings: small JSON documents).
pub const SERVICE_SMALL_BODY_MAX: u64 = 1024 * 1024;

/// When a body that started at `started` and has `received` bytes so far must
/// be complete: no read may be more than `head_timeout` after the previous one,
/// the body must average at least `body_rate_min` bytes/s beyond a first
/// `head_timeout`, and it must end within `body_timeout_max` in any case. A
/// client trickling a byte now and then is cut off (408) instead of holding
/// its connection for ever.
fn body_deadline(
    limits: &crate::config::HttpLimits,
    started: Instant,
    received: usize,
    now: Instant,
) -> Instant {
    let rate = limits.body_rate_min.max(1);
    let earned = std::time::Duration::from_millis((received as u64).saturating_mul(1000) / rate);
    (now + limits.head_timeout)
        .min(started + limits.head_timeout + earned)
        .min(started + limits.body_timeout_max)
}

/// The state of a connection whose request `req` was handed off.
pub(crate) fn waiting_on(req: &Request) -> ConnState {
    ConnState::Waiting {
        head_only: req.method == "HEAD",
        keep_alive: req.keep_alive,
        announce_keep_alive: req.keep_alive && req.version == parse::Version::Http10,
        invoke: false,
        chunked_ok: req.version != parse::Version::Http10,
        stream: None,
    }
}

/// The machine-readable code of a parse error.
fn error_code(e: &ParseError) -> &'static str {
    match e {
        ParseError::BadRequest(_) => "bad_request",
        ParseError::VersionNotSupported => "http_version_not_supported",
        ParseError::HeadTooLarge => "head_too_large",
        ParseError::TooManyHeaders => "too_many_headers",
        ParseError::BodyTooLarge => "payload_too_large",
        ParseError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
    }
}

/// Marks `n` bytes of a read buffer consumed (field-level twin of `Stream::consume`,
/// usable while the connection state is borrowed).
fn consume(rbuf: &mut Vec<u8>, rpos: &mut usize, n: usize) {
    *rpos += n;
    debug_assert!(*rpos <= rbuf.len());
    if *rpos == rbuf.len() {
        rbuf.clear();
        *rpos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_body_fits_the_input_budget_beside_the_others() {
        let mib = 1 << 20;
        assert!(fits_input(10 * mib, 16 * mib, 6 * mib));
        assert!(!fits_input(11 * mib, 16 * mib, 6 * mib));
        // Empty bodies always fit, even over the budget.
        assert!(fits_input(20 * mib, 16 * mib, 0));
        // Alone, any body fits (its own charge is not among the others).
        assert!(fits_input(0, 16 * mib, 60 * mib));
        assert!(!fits_input(1, 16 * mib, 60 * mib));
    }

    #[test]
    fn a_trickling_body_runs_out_of_time() {
        let limits = crate::config::HttpLimits::default();
        let t0 = Instant::now();
        // One byte every 1.4 s: each read is within the gap, but the average rate
        // is far below the minimum, so the deadline stops moving after ~10 s.
        let mut now = t0;
        let mut deadline = body_deadline(&limits, t0, 0, now);
        for received in 1..100 {
            now += Duration::from_millis(1400);
            if now > deadline {
                assert!(
                    now - t0 < Duration::from_secs(12),
                    "cut off at {:?}",
                    now - t0
                );
                return;
            }
            deadline = body_deadline(&limits, t0, received, now);
        }
        panic!("a body of one byte per 1.4 s was never cut off");
    }

    #[test]
    fn a_steady_body_keeps_its_time_until_the_total_limit() {
        let limits = crate::config::HttpLimits::default();
        let t0 = Instant::now();
        // 64 KiB/s for 100 s: well above the minimum rate.
        let at = t0 + Duration::from_secs(100);
        let d = body_deadline(&limits, t0, 100 * 64 * 1024, at);
        assert_eq!(d, at + limits.head_timeout);
        // Past the total limit nothing helps.
        let late = t0 + limits.body_timeout_max;
        assert_eq!(
            body_deadline(&limits, t0, usize::MAX / 2, late),
            t0 + limits.body_timeout_max
        );
    }
}
