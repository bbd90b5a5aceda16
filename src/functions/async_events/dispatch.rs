//! Runs queued events: a dispatcher thread picks what may run, a pool of
//! invoker threads runs each through the server's own Lambda service API on
//! loopback (`Invoke`, `RequestResponse`), and the outcome decides: ack,
//! retry later, or give up and keep the event as failed.
//!
//! Why loopback: an event then runs exactly like a synchronous invocation —
//! accepted by one core, scheduled there with the same instances, queues,
//! limits, timeouts and metrics, never crossing engine threads — and the
//! scheduler needs no second entry point. It costs a loopback connection per
//! invoker (kept alive) and an HTTP round trip per event, small next to a run.
//!
//! Async work yields to synchronous traffic: at most half of a function's
//! concurrency limit (at least one) runs its events at once, so requests
//! always find the other half; and to other functions' events: one function
//! holds at most half of the invokers ([`INVOKERS_PER_FUNCTION_MAX`]). As on
//! Lambda, only function errors (the handler failed, timed out or crashed
//! while running) use attempts:
//! throttled events (429) and the service's own errors (a 5xx without
//! `X-Amz-Function-Error`: no memory for an instance, a start that failed)
//! wait, with a backoff, and are tried again until they are too old.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::config::EventConfig;
use super::log::EventRecord;
use super::queue::Pending;
use super::{AsyncEvents, FunctionEvents};
use crate::functions::budget::{Budget, Reservation};
use crate::util::time::unix_time_ms;

/// Threads running events, and so the most events running at once server-wide.
pub const INVOKERS: usize = 32;
/// Most invokers one function's events hold at once, whatever its
/// concurrency limit: the others stay free for other functions' events,
/// however slow its own backlog is.
pub const INVOKERS_PER_FUNCTION_MAX: usize = INVOKERS / 2;
/// Delay before a throttled (429) event or one the service failed (5xx) is
/// tried again, ms; it doubles with each such try of the event, up to
/// [`DEFERRED_RETRY_MAX_MS`].
pub const THROTTLED_RETRY_MS: u64 = 200;
/// Longest delay before a throttled event or one the service failed is tried again, ms.
pub const DEFERRED_RETRY_MAX_MS: u64 = 5_000;
/// Delay before trying again when the server could not be reached, ms.
pub const UNREACHABLE_RETRY_MS: u64 = 1000;
/// Longest wait for an invocation's answer: the longest function timeout and a margin.
pub const ANSWER_WAIT: Duration = Duration::from_secs(900 + 30);
/// Largest answer read from an invocation (the 6 MiB response limit and a margin).
pub const ANSWER_BYTES_MAX: usize = 7 << 20;
/// Failed events waiting to be POSTed to the webhook; more are not sent.
pub const WEBHOOK_PENDING_MAX: usize = 1000;
/// Bytes of the failed events waiting to be POSTed (each holds its payload,
/// up to 1 MiB, and its error, up to an answer's size); more are not sent.
pub const WEBHOOK_PENDING_BYTES_MAX: u64 = 16 << 20;
/// Connect, write and read timeout of a webhook POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Wakes the dispatcher.
#[derive(Default)]
pub struct Waker {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Waker {
    /// Makes the dispatcher look at the queues again.
    pub fn wake(&self) {
        *self.woken.lock().unwrap() = true;
        self.cv.notify_one();
    }

    fn wait(&self, limit: Duration) {
        let mut w = self.woken.lock().unwrap();
        if !*w {
            w = self.cv.wait_timeout(w, limit).unwrap().0;
        }
        *w = false;
    }
}

/// Where events are invoked: the server's own address and credential.
#[derive(Clone, Debug)]
pub struct Target {
    /// A loopback address the server listens on.
    pub addr: SocketAddr,
    /// `Authorization` value (the admin token as a bearer), if the service API needs one.
    pub authorization: Option<String>,
}

/// The concurrency limit of the function a queue key names, if it exists.
pub type Concurrency = Box<dyn Fn(&str) -> Option<u32> + Send + Sync>;

struct Job {
    events: Arc<FunctionEvents>,
    pending: Pending,
    record: EventRecord,
}

/// How one run went.
#[derive(Debug)]
enum Outcome {
    Succeeded,
    /// The handler failed (threw, timed out, crashed): the error payload.
    Failed(Value),
    /// The service refused the event for good (e.g. 400): no retry.
    Refused(Value),
    /// 429: try again later, without using an attempt.
    Throttled,
    /// The service failed (a 5xx that is no function error): try again
    /// later, without using an attempt.
    ServiceFailed(Value),
    /// The function is gone.
    Gone,
    /// The server could not be reached.
    Unreachable(String),
}

impl AsyncEvents {
    /// Starts the dispatcher and its invokers, running events against `target`.
    pub fn start_dispatch(self: &Arc<Self>, target: Target, concurrency: Concurrency) {
        if self.wake.set(Waker::default()).is_err() {
            return;
        }
        let webhook = self.limits.failure_webhook.clone().map(start_webhook);
        let (job_tx, job_rx) = channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let running = Arc::new(AtomicUsize::new(0));
        for i in 0..INVOKERS {
            let (me, rx, target, running, webhook) = (
                self.clone(),
                job_rx.clone(),
                target.clone(),
                running.clone(),
                webhook.clone(),
            );
            std::thread::Builder::new()
                .name(format!("hearth-async{i}"))
                .spawn(move || me.invoker(&rx, &target, &running, webhook.as_ref()))
                .expect("spawn an async invoker");
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("hearth-async-dispatch".into())
            .spawn(move || me.dispatcher(&job_tx, &running, &concurrency))
            .expect("spawn the async dispatcher");
    }

    /// Hands due events to the invokers, one per function per round (so
    /// functions share the invokers fairly), within each function's share.
    /// Every invoker comes back here once its event is done, and each round
    /// starts after the function served last: a function with a deep
    /// backlog gets a free invoker only in its turn among those with events
    /// ready, never all of them for as long as its backlog lasts.
    fn dispatcher(
        &self,
        jobs: &std::sync::mpsc::Sender<Job>,
        running: &AtomicUsize,
        concurrency: &Concurrency,
    ) {
        let waker = self.wake.get().expect("set before the thread starts");
        // The key of the function served last.
        let mut last = String::new();
        loop {
            let now = unix_time_ms();
            self.check_set_aside(now);
            let queues = self.all();
            let mut shares: Vec<Option<usize>> = vec![None; queues.len()];
            let mut progress = true;
            while progress && running.load(Ordering::Acquire) < INVOKERS {
                progress = false;
                // Sorted by key: the round starts after `last`, wrapping.
                let start = queues.partition_point(|q| q.queue.key <= last);
                for i in (start..queues.len()).chain(0..start) {
                    if running.load(Ordering::Acquire) >= INVOKERS {
                        break;
                    }
                    let q = &queues[i];
                    if !q.queue.has_due(now) {
                        continue;
                    }
                    let share = *shares[i].get_or_insert_with(|| {
                        concurrency(&q.queue.key)
                            .map_or(1, |c| (c as usize / 2).clamp(1, INVOKERS_PER_FUNCTION_MAX))
                    });
                    if let Some((pending, record)) = q.queue.take(now, share) {
                        running.fetch_add(1, Ordering::AcqRel);
                        let job = Job {
                            events: q.clone(),
                            pending,
                            record,
                        };
                        if jobs.send(job).is_err() {
                            return;
                        }
                        last.clone_from(&q.queue.key);
                        progress = true;
                    }
                }
            }
            let next = queues
                .iter()
                .filter_map(|q| q.queue.next_due_ms())
                .min()
                .unwrap_or(now + 1000);
            waker.wait(Duration::from_millis(
                next.saturating_sub(now).clamp(1, 1000),
            ));
        }
    }

    fn invoker(
        &self,
        jobs: &Mutex<Receiver<Job>>,
        target: &Target,
        running: &AtomicUsize,
        webhook: Option<&Webhook>,
    ) {
        let mut conn: Option<TcpStream> = None;
        loop {
            let job = match jobs.lock().unwrap().recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            // Done, the invoker goes back to the dispatcher, which gives it
            // to whichever function's turn it is.
            self.run(job, target, &mut conn, webhook);
            running.fetch_sub(1, Ordering::AcqRel);
            self.wake_dispatcher();
        }
    }

    /// Runs one event (unless it is too old) and settles it.
    fn run(
        &self,
        job: Job,
        target: &Target,
        conn: &mut Option<TcpStream>,
        webhook: Option<&Webhook>,
    ) {
        let Job {
            events,
            mut pending,
            record,
            ..
        } = job;
        if !events.queue.is_running(pending.seq) {
            // Dropped with its version or alias while it waited for this invoker.
            return;
        }
        let cfg = events.config(&record.qualifier).unwrap_or_default();
        let now = unix_time_ms();
        if too_old(&pending, &cfg, now) {
            return self.give_up(
                &events,
                &pending,
                &record,
                "EventAgeExceeded",
                Value::Null,
                webhook,
            );
        }
        let outcome = invoke(target, conn, &events.queue.key, &record);
        let m = &events.queue.metrics;
        let now = unix_time_ms();
        match outcome {
            Outcome::Succeeded => {
                m.succeeded.fetch_add(1, Ordering::Relaxed);
                events.queue.finish_ack(&pending);
            }
            Outcome::Gone => {
                eprintln!(
                    "hearth: async event {} of {}: the function is gone; dropped",
                    record.request_id, events.queue.key
                );
                events.queue.finish_ack(&pending);
            }
            Outcome::Throttled | Outcome::ServiceFailed(_) | Outcome::Unreachable(_) => {
                match &outcome {
                    Outcome::Unreachable(why) => {
                        eprintln!("hearth: async dispatch cannot reach the server: {why}")
                    }
                    Outcome::ServiceFailed(error) if pending.deferrals == 0 => eprintln!(
                        "hearth: async event {} of {}: the service failed ({error}); trying again",
                        record.request_id, events.queue.key
                    ),
                    _ => {}
                }
                let wait = match outcome {
                    Outcome::Unreachable(_) => UNREACHABLE_RETRY_MS,
                    _ => deferred_retry_ms(pending.deferrals),
                };
                pending.deferrals = pending.deferrals.saturating_add(1);
                pending.not_before_ms = now + wait;
                events.queue.finish_later(pending);
            }
            Outcome::Refused(error) => {
                pending.attempts += 1;
                self.give_up(&events, &pending, &record, "Refused", error, webhook)
            }
            Outcome::Failed(error) => {
                pending.attempts += 1;
                if pending.attempts > cfg.retries_max {
                    return self.give_up(
                        &events,
                        &pending,
                        &record,
                        "RetriesExhausted",
                        error,
                        webhook,
                    );
                }
                let shift = (pending.attempts - 1).min(16);
                pending.not_before_ms = now + self.limits.retry_base_ms.saturating_mul(1 << shift);
                if too_old(&pending, &cfg, pending.not_before_ms) {
                    return self.give_up(
                        &events,
                        &pending,
                        &record,
                        "EventAgeExceeded",
                        error,
                        webhook,
                    );
                }
                // Counted once its retry record is written: a count seen
                // (by a test that kills the server then) is a retry on disk.
                events.queue.finish_retry(pending);
                m.retried.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Keeps a given-up event as failed (durably, before its ack), and tells the webhook.
    fn give_up(
        &self,
        events: &FunctionEvents,
        pending: &Pending,
        record: &EventRecord,
        condition: &str,
        error: Value,
        webhook: Option<&Webhook>,
    ) {
        if !events.queue.is_running(pending.seq) {
            // Dropped with its version or alias while it ran: no failure to keep.
            return;
        }
        let payload = match std::str::from_utf8(&record.body) {
            Ok(s) => json!(s),
            Err(_) => {
                json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&record.body) })
            }
        };
        let failure = json!({
            "requestId": record.request_id,
            "function": events.queue.key,
            "qualifier": if record.qualifier.is_empty() { "$LATEST" } else { &record.qualifier },
            "condition": condition,
            "attempts": pending.attempts,
            "acceptedMs": record.accepted_ms,
            "failedMs": unix_time_ms(),
            "error": error,
            "payload": payload,
        });
        if let Err(e) = events.failed.lock().unwrap().push(&failure) {
            eprintln!(
                "hearth: async event {} of {} failed ({condition}) and cannot be kept: {e}",
                record.request_id, events.queue.key
            );
        }
        events.queue.metrics.failed.fetch_add(1, Ordering::Relaxed);
        events.queue.finish_ack(pending);
        if let Some(w) = webhook {
            // A full webhook backlog drops the notification, never the record.
            w.send(&failure);
        }
    }
}

/// The delay before a run put off `deferrals` times already is tried again.
fn deferred_retry_ms(deferrals: u32) -> u64 {
    THROTTLED_RETRY_MS
        .saturating_mul(1 << deferrals.min(16))
        .min(DEFERRED_RETRY_MAX_MS)
}

fn too_old(p: &Pending, cfg: &EventConfig, at_ms: u64) -> bool {
    at_ms.saturating_sub(p.accepted_ms) > cfg.event_age_s_max * 1000
}

/// Invokes `record` through the service API, reusing `conn` (one retry on a
/// fresh connection when a kept one turns out closed).
fn invoke(
    target: &Target,
    conn: &mut Option<TcpStream>,
    key: &str,
    record: &EventRecord,
) -> Outcome {
    let name = if record.qualifier.is_empty() {
        key.to_string()
    } else {
        format!("{key}:{}", record.qualifier)
    };
    let mut head = format!(
        "POST /2015-03-31/functions/{name}/invocations HTTP/1.1\r\nHost: {}\r\n\
         X-Amz-Invocation-Type: RequestResponse\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        target.addr,
        record.body.len()
    );
    if let Some(a) = &target.authorization {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    for fresh in [conn.is_none(), true] {
        if fresh {
            *conn = match TcpStream::connect_timeout(&target.addr, Duration::from_secs(5)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(ANSWER_WAIT));
                    Some(s)
                }
                Err(e) => return Outcome::Unreachable(e.to_string()),
            };
        }
        let s = conn.as_mut().expect("connected");
        let sent = s
            .write_all(head.as_bytes())
            .and_then(|()| s.write_all(&record.body));
        match sent.and_then(|()| read_answer(s)) {
            Ok((status, function_error, body, close)) => {
                if close {
                    *conn = None;
                }
                return classify(status, function_error, &body);
            }
            Err(e) => {
                *conn = None;
                if fresh {
                    return Outcome::Unreachable(e.to_string());
                }
            }
        }
    }
    unreachable!("the second attempt is on a fresh connection")
}

fn classify(status: u16, function_error: bool, body: &[u8]) -> Outcome {
    let payload =
        || serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)));
    match status {
        // The handler failed, timed out or crashed while it ran.
        _ if function_error => Outcome::Failed(payload()),
        200 => Outcome::Succeeded,
        429 => Outcome::Throttled,
        404 => Outcome::Gone,
        400..=499 => Outcome::Refused(payload()),
        _ => Outcome::ServiceFailed(json!({ "status": status, "body": payload() })),
    }
}

/// Reads one answer: status, whether `X-Amz-Function-Error` is set, body,
/// and whether the server closes the connection after it.
fn read_answer(s: &mut TcpStream) -> io::Result<(u16, bool, Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let head_len = match r.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "answer head too large",
                ))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        let status = r.code.unwrap_or(0);
        let mut length = None;
        let (mut function_error, mut close) = (false, false);
        for h in r.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if h.name.eq_ignore_ascii_case("x-amz-function-error") {
                function_error = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let length = length.filter(|&l| l <= ANSWER_BYTES_MAX).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "answer without a usable content-length",
            )
        })?;
        let mut body = buf.split_off(head_len);
        while body.len() < length {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "answer cut short",
                ));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        return Ok((status, function_error, body, close));
    }
}

/// An `http://host[:port][/path]` URL: the address to connect to, the Host
/// value and the path.
pub fn parse_webhook(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("--async-failure-webhook {url:?}: only http:// URLs are supported")
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() || host.contains('@') {
        return Err(format!(
            "--async-failure-webhook {url:?}: no host (or credentials in it)"
        ));
    }
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

/// The way to the thread that POSTs failed events: at most
/// [`WEBHOOK_PENDING_MAX`] events and [`WEBHOOK_PENDING_BYTES_MAX`] bytes wait.
#[derive(Clone)]
pub struct Webhook {
    tx: SyncSender<(Vec<u8>, Reservation)>,
    waiting_bytes: Arc<Budget>,
}

impl Webhook {
    /// Queues `failure` to be POSTed, unless the backlog is full (then it is not sent).
    fn send(&self, failure: &Value) -> bool {
        let body = serde_json::to_vec(failure).expect("json");
        let Some(held) = self.waiting_bytes.try_reserve(body.len() as u64) else {
            return false;
        };
        self.tx.try_send((body, held)).is_ok()
    }
}

/// Starts the thread that POSTs failed events to `url` (one attempt each).
fn start_webhook(url: String) -> Webhook {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, Reservation)>(WEBHOOK_PENDING_MAX);
    std::thread::Builder::new()
        .name("hearth-async-webhook".into())
        .spawn(move || {
            let Ok((host, path)) = parse_webhook(&url) else {
                return;
            };
            while let Ok((failure, _held)) = rx.recv() {
                if let Err(e) = post(&host, &path, &failure) {
                    eprintln!("hearth: the failure webhook {url} failed: {e}");
                }
            }
        })
        .expect("spawn the webhook thread");
    Webhook {
        tx,
        waiting_bytes: Budget::new("webhook backlog", "bytes", WEBHOOK_PENDING_BYTES_MAX),
    }
}

fn post(host: &str, path: &str, body: &[u8]) -> io::Result<()> {
    use std::net::ToSocketAddrs;
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, WEBHOOK_TIMEOUT)?;
    s.set_read_timeout(Some(WEBHOOK_TIMEOUT))?;
    s.set_write_timeout(Some(WEBHOOK_TIMEOUT))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    match std::str::from_utf8(&status[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(200..=299) => Ok(()),
        other => Err(io::Error::other(format!("answered {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_lambda_would_retry_them() {
        assert!(matches!(classify(200, false, b"{}"), Outcome::Succeeded));
        assert!(matches!(
            classify(200, true, b"{\"errorType\":\"Error\"}"),
            Outcome::Failed(_)
        ));
        assert!(matches!(classify(429, false, b""), Outcome::Throttled));
        assert!(matches!(classify(404, false, b""), Outcome::Gone));
        assert!(matches!(classify(400, false, b"x"), Outcome::Refused(_)));
        // Hearth's own errors (no memory for an instance, a start that
        // failed) use no attempt; a function error does, whatever the status.
        assert!(matches!(
            classify(503, false, b""),
            Outcome::ServiceFailed(_)
        ));
        assert!(matches!(
            classify(500, false, b""),
            Outcome::ServiceFailed(_)
        ));
        assert!(matches!(classify(502, true, b"{}"), Outcome::Failed(_)));
    }

    #[test]
    fn deferred_runs_back_off_to_a_bound() {
        assert_eq!(deferred_retry_ms(0), THROTTLED_RETRY_MS);
        assert_eq!(deferred_retry_ms(1), 2 * THROTTLED_RETRY_MS);
        assert_eq!(deferred_retry_ms(40), DEFERRED_RETRY_MAX_MS);
    }

    /// When the stand-in service saw each invocation, by function.
    type Seen = Arc<Mutex<Vec<(String, std::time::Instant)>>>;

    /// A stand-in for the service API's `Invoke` on loopback: answers the
    /// `n`th invocation of a function with `answer(function, n)` (status,
    /// whether it is a function error, how long it takes).
    fn fake_service(
        answer: impl Fn(&str, usize) -> (u16, bool, Duration) + Send + Sync + 'static,
    ) -> (SocketAddr, Seen) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let (answer, log) = (Arc::new(answer), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let (answer, log) = (answer.clone(), log.clone());
                std::thread::spawn(move || serve(conn.unwrap(), &*answer, &log));
            }
        });
        (addr, seen)
    }

    fn serve(mut s: TcpStream, answer: &dyn Fn(&str, usize) -> (u16, bool, Duration), seen: &Seen) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = req.parse(&buf) else {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let length: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap();
            let name = req.path.unwrap().split('/').nth(3).unwrap().to_string();
            while buf.len() < head + length {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head + length);
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push((name.clone(), std::time::Instant::now()));
                seen.iter().filter(|(f, _)| *f == name).count() - 1
            };
            let (status, function_error, delay) = answer(&name, n);
            std::thread::sleep(delay);
            let marker = if function_error {
                "X-Amz-Function-Error: Unhandled\r\n"
            } else {
                ""
            };
            let reply = format!("HTTP/1.1 {status} X\r\n{marker}Content-Length: 2\r\n\r\n{{}}");
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// A dispatcher running events against `addr`, every function with
    /// concurrency limit `concurrency(key)`.
    fn dispatching(
        addr: SocketAddr,
        concurrency: fn(&str) -> Option<u32>,
    ) -> (std::path::PathBuf, Arc<AsyncEvents>) {
        let d = std::env::temp_dir().join(format!(
            "hearth-dispatch-{}-{:x}",
            std::process::id(),
            crate::util::random::random_u64()
        ));
        let limits = super::super::AsyncLimits {
            queue_bytes_max: u64::MAX,
            disk_bytes_max: u64::MAX,
            retry_base_ms: 50,
            failure_webhook: None,
        };
        let ev = Arc::new(AsyncEvents::open(&d, limits, |_| true).unwrap());
        ev.start_committer();
        let target = Target {
            addr,
            authorization: None,
        };
        ev.start_dispatch(target, Box::new(concurrency));
        (d, ev)
    }

    fn send(ev: &AsyncEvents, key: &str, n: usize) -> Arc<FunctionEvents> {
        let events = ev.queue_for(key, || true).unwrap().unwrap();
        for _ in 0..n {
            let done = Box::new(|r: Result<(), _>| assert!(r.is_ok()));
            let sent = ev.submit(
                events.clone(),
                String::new(),
                "r".into(),
                b"{}".to_vec(),
                done,
                Box::new(|| true),
            );
            assert!(sent.is_ok());
        }
        events
    }

    fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn service_errors_are_tried_again_without_using_attempts() {
        // Three 503s (no memory for an instance, say), then the run succeeds.
        let (addr, seen) = fake_service(|_, n| match n {
            0..=2 => (503, false, Duration::ZERO),
            _ => (200, false, Duration::ZERO),
        });
        let (d, ev) = dispatching(addr, |_| Some(2));
        let events = ev.queue_for("f", || true).unwrap().unwrap();
        events
            .edit_config("", |_| {
                Some(EventConfig {
                    retries_max: 0,
                    ..EventConfig::default()
                })
            })
            .unwrap();
        send(&ev, "f", 1);
        let m = &events.queue.metrics;
        wait_for(Duration::from_secs(20), "the event to be settled", || {
            m.succeeded.load(Ordering::Relaxed) + m.failed.load(Ordering::Relaxed) > 0
        });
        assert_eq!(
            m.failed.load(Ordering::Relaxed),
            0,
            "given up on a service error"
        );
        assert_eq!(m.succeeded.load(Ordering::Relaxed), 1);
        assert_eq!(seen.lock().unwrap().len(), 4);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Holds the stand-in service's answers until the test lets them go:
    /// `None`, all go; `Some(n)`, `n` more may.
    struct Gate {
        permits: Mutex<Option<usize>>,
        cv: Condvar,
    }

    impl Gate {
        fn closed() -> Gate {
            Gate {
                permits: Mutex::new(Some(0)),
                cv: Condvar::new(),
            }
        }

        fn pass(&self) {
            let mut p = self.permits.lock().unwrap();
            loop {
                match *p {
                    None => return,
                    Some(n) if n > 0 => {
                        *p = Some(n - 1);
                        return;
                    }
                    Some(_) => p = self.cv.wait(p).unwrap(),
                }
            }
        }

        fn let_one_go(&self) {
            if let Some(n) = self.permits.lock().unwrap().as_mut() {
                *n += 1;
            }
            self.cv.notify_all();
        }

        fn open(&self) {
            *self.permits.lock().unwrap() = None;
            self.cv.notify_all();
        }
    }

    #[test]
    fn a_deep_backlog_of_slow_events_does_not_hold_every_invoker() {
        // The hog's runs last until the test lets each go: which runs are
        // under way is then known whatever the machine's load (it used to be
        // timed against 250 ms runs, which a loaded machine stretched).
        let gate = Arc::new(Gate::closed());
        let held = gate.clone();
        let (addr, seen) = fake_service(move |f, _| {
            if f == "hog" {
                held.pass();
            }
            (200, false, Duration::ZERO)
        });
        // The hog's share (half its limit) is more than all the invokers.
        let (d, ev) = dispatching(addr, |f| Some(if f == "hog" { 1000 } else { 10 }));
        let backlog = 10 * INVOKERS;
        let hog = send(&ev, "hog", backlog);
        let count = |f: &str| seen.lock().unwrap().iter().filter(|(g, _)| g == f).count();
        wait_for(
            Duration::from_secs(20),
            "the hog to take its share of the invokers",
            || count("hog") >= INVOKERS_PER_FUNCTION_MAX,
        );
        send(&ev, "quick", 1);
        // An invoker the hog cannot take is free for it: it runs while every
        // run of the hog is still under way.
        wait_for(Duration::from_secs(20), "the quick event to run", || {
            count("quick") == 1
        });
        assert_eq!(
            count("hog"),
            INVOKERS_PER_FUNCTION_MAX,
            "the hog holds more than its share"
        );
        // And the hog keeps its share busy: each run that ends is followed
        // by another of its backlog while the others are still under way.
        for ended in 1..=INVOKERS_PER_FUNCTION_MAX {
            gate.let_one_go();
            wait_for(
                Duration::from_secs(20),
                "the next of the hog's events to run",
                || count("hog") >= INVOKERS_PER_FUNCTION_MAX + ended,
            );
            assert_eq!(count("hog"), INVOKERS_PER_FUNCTION_MAX + ended);
        }
        gate.open();
        wait_for(
            Duration::from_secs(60),
            "the hog's backlog to drain",
            || hog.queue.depth() == 0,
        );
        assert_eq!(count("hog"), backlog);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn failures_waiting_for_the_webhook_are_bounded_in_bytes() {
        // Nothing takes them: the POSTing thread is not started.
        let (tx, rx) = std::sync::mpsc::sync_channel(WEBHOOK_PENDING_MAX);
        let hook = Webhook {
            tx,
            waiting_bytes: Budget::new("webhook backlog", "bytes", WEBHOOK_PENDING_BYTES_MAX),
        };
        let big = json!({ "payload": "x".repeat(1 << 20) });
        let fits = (WEBHOOK_PENDING_BYTES_MAX >> 20) as usize;
        assert!(fits < WEBHOOK_PENDING_MAX, "the byte bound comes first");
        let sent = (0..fits + 1).filter(|_| hook.send(&big)).count();
        assert!(sent < fits, "{sent} failures of 1 MiB wait");
        assert!(hook.send(&json!({})), "a small one still fits");
        // Sent, they free their room.
        assert_eq!(rx.try_iter().count(), sent + 1);
        assert!(hook.send(&big));
    }

    #[test]
    fn webhook_urls_are_plain_http_with_a_host() {
        assert_eq!(
            parse_webhook("http://127.0.0.1:9000/hook").unwrap(),
            ("127.0.0.1:9000".to_string(), "/hook".to_string())
        );
        assert_eq!(
            parse_webhook("http://example.test").unwrap(),
            ("example.test:80".to_string(), "/".to_string())
        );
        assert!(parse_webhook("https://x/").is_err());
        assert!(parse_webhook("http://u:p@x/").is_err());
    }
}
