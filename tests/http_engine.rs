//! The HTTP front end seen from the wire: a real `hearth serve` process driven
//! with raw TCP bytes. Every case runs on both I/O drivers (`--io uring` and
//! `--io epoll`) and pins status codes, the JSON error shape, and whether the
//! connection was kept or closed. No function runs here; the routes used are
//! `/healthz`, `/metrics` and paths that 404 or 405.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{metric_sum, parse_responses, raise_nofile, Client, Response, Server};

/// Starts a server for engine tests on the `io` driver.
///
/// Node.js is stubbed: no function runs here, and in a fresh state dir the process
/// backend would hash the ~100 MB node binary for its runtime root's key (seconds in
/// a debug build).
fn start(io: &str, extra: &[&str]) -> Server {
    start_with(io, extra, |_| {})
}

fn start_with(io: &str, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
    let mut args = vec!["--io", io, "--no-standby"];
    args.extend_from_slice(extra);
    Server::start_with(&args, &[("HEARTH_NODE", "/usr/bin/true")], configure)
}

const GET_HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

/// Sends `bytes` on a new connection and returns the responses and whether the
/// server closed the connection within `limit`.
fn exchange(server: &Server, bytes: &[u8], limit: Duration) -> (Vec<Response>, bool) {
    let mut c = server.connect();
    // The server may answer and close before it has read everything (413, 431).
    c.try_write(bytes);
    let (raw, closed) = c.read_to_close(limit);
    (parse_responses(&raw), closed)
}

/// Asserts `bytes` is answered by exactly one `status` response with the JSON
/// error `code`, the connection is closed, and the server is still healthy.
fn assert_rejected(server: &Server, bytes: &[u8], status: u16, code: &str) {
    let what = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    let (responses, closed) = exchange(server, bytes, Duration::from_secs(5));
    assert_eq!(responses.len(), 1, "{what:?}: {responses:?}");
    let r = &responses[0];
    assert_eq!(r.status, status, "{what:?}: {}", r.text());
    r.assert_json_error(code);
    assert_eq!(r.header("connection"), Some("close"), "{what:?}");
    assert!(closed, "{what:?}: connection left open after {status}");
    server.assert_healthy();
}

/// Declares each case as a test on io_uring and as a test on epoll.
macro_rules! on_both_drivers {
    ($($case:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $case() { super::$case("uring") } )*
        }
        mod epoll {
            $( #[test] fn $case() { super::$case("epoll") } )*
        }
    };
}

on_both_drivers!(
    healthz_answers_ok,
    metrics_expose_per_core_counters_that_move,
    unknown_path_is_a_json_404,
    wrong_method_is_405_with_allow,
    keep_alive_serves_two_requests_on_one_connection,
    pipelined_requests_are_answered_in_order,
    empty_body_is_answered_without_waiting,
    http10_closes_unless_keep_alive_is_asked,
    connection_close_is_honoured,
    half_closed_client_still_gets_its_answers,
    head_gets_length_without_body,
    expect_continue_gets_100_before_the_answer,
    chunked_extensions_and_trailers_are_accepted,
    malformed_heads_are_400_and_close,
    unsupported_versions_are_505,
    oversized_heads_are_431,
    oversized_body_is_413_without_waiting_for_it,
    ambiguous_framing_is_400,
    unknown_transfer_coding_is_501,
    partial_head_times_out_with_408,
    idle_keep_alive_connection_is_closed,
    slowloris_gets_408_at_the_head_deadline,
    connections_over_the_limit_get_503,
    ten_thousand_requests_on_one_connection,
    thousand_concurrent_connections,
    running_out_of_descriptors_pauses_accepts_then_recovers,
    sigterm_drains_and_refuses_new_connections,
);

fn healthz_answers_ok(io: &str) {
    let s = start(io, &[]);
    let r = s.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("content-length"), Some("2"));
    assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")));
    // An absolute-form target is served by its path.
    let mut c = s.connect();
    c.write(b"GET http://example.test/healthz?probe=1 HTTP/1.1\r\nHost: example.test\r\n\r\n");
    let r = c.response();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
}

fn metrics_expose_per_core_counters_that_move(io: &str) {
    let s = start(io, &["--cores", "2"]);
    let before = s.get("/metrics");
    assert_eq!(before.status, 200);
    assert!(before
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = before.text();
    for series in [
        "hearth_open_connections{core=\"0\"}",
        "hearth_open_connections{core=\"1\"}",
        "hearth_accepted_connections_total{core=\"0\"}",
        "hearth_responses_total{core=\"0\",class=\"2xx\"}",
        "hearth_responses_total{core=\"0\",class=\"4xx\"}",
        "hearth_parse_errors_total{core=\"0\"}",
        "hearth_bytes_in_total{core=\"0\"}",
        "hearth_bytes_out_total{core=\"0\"}",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    assert!(text.contains("# TYPE hearth_open_connections gauge"));
    assert!(text.contains("# TYPE hearth_parse_errors_total counter"));
    // The connection asking is open while the page is rendered.
    assert!(metric_sum(&text, "hearth_open_connections", "") >= 1);

    let request = b"GET /not-here HTTP/1.1\r\nHost: t\r\n\r\nBROKEN\r\n\r\n";
    let (responses, closed) = exchange(&s, request, Duration::from_secs(5));
    assert_eq!(
        responses.iter().map(|r| r.status).collect::<Vec<_>>(),
        [404, 400]
    );
    assert!(closed);

    let after = s.get("/metrics").text();
    let moved = |name: &str, label: &str| {
        (
            metric_sum(&text, name, label),
            metric_sum(&after, name, label),
        )
    };
    let (a, b) = moved("hearth_parse_errors_total", "");
    assert_eq!(b, a + 1, "parse errors");
    let (a, b) = moved("hearth_responses_total", "class=\"4xx\"");
    assert_eq!(b, a + 2, "4xx responses");
    let (a, b) = moved("hearth_responses_total", "class=\"2xx\"");
    assert!(b > a, "2xx responses: the first /metrics answer counts");
    let (a, b) = moved("hearth_bytes_in_total", "");
    assert!(b >= a + request.len() as u64, "bytes in {a} -> {b}");
    let (a, b) = moved("hearth_bytes_out_total", "");
    assert!(b > a + before.body.len() as u64, "bytes out {a} -> {b}");
    let (a, b) = moved("hearth_accepted_connections_total", "");
    assert_eq!(b, a + 2, "accepted connections");
}

fn unknown_path_is_a_json_404(io: &str) {
    let s = start(io, &[]);
    let r = s.get("/nope?x=1");
    assert_eq!(r.status, 404);
    r.assert_json_error("not_found");
    assert!(r.json()["error"].as_str().unwrap().contains("/nope"));
}

fn wrong_method_is_405_with_allow(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(b"DELETE /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    r.assert_json_error("method_not_allowed");
    // A 405 is an ordinary answer: the connection stays usable.
    c.write(b"PUT /deploy HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    c.write(GET_HEALTHZ);
    assert_eq!(c.response().status, 200);
}

fn keep_alive_serves_two_requests_on_one_connection(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    for _ in 0..2 {
        c.write(GET_HEALTHZ);
        let r = c.response();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(
            r.header("connection"),
            None,
            "HTTP/1.1 keeps alive silently"
        );
    }
    c.assert_open(Duration::from_millis(200));
}

fn pipelined_requests_are_answered_in_order(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(
        concat!(
            "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
            "POST /nope-length HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world",
            "POST /nope-chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            "GET /missing HTTP/1.1\r\nHost: t\r\n\r\n",
            "HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    );
    let first = c.response();
    assert_eq!((first.status, first.text().as_str()), (200, "ok"));
    for path in ["/nope-length", "/nope-chunked", "/missing"] {
        let r = c.response();
        assert_eq!(r.status, 404);
        assert!(
            r.text().contains(path),
            "expected the 404 for {path}, got {}",
            r.text()
        );
    }
    let head = c.head_response();
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("2"))
    );
    let last = c.response();
    assert_eq!((last.status, last.text().as_str()), (200, "ok"));
    assert_eq!(last.header("connection"), Some("close"));
    c.assert_closed(Duration::from_secs(3));
}

fn empty_body_is_answered_without_waiting(io: &str) {
    let s = start(io, &["--head-timeout-ms", "20000"]);
    let mut c = s.connect();
    for framing in ["Content-Length: 0", "Transfer-Encoding: chunked"] {
        let started = Instant::now();
        c.write(format!("POST /nope HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n").as_bytes());
        if framing.contains("chunked") {
            c.write(b"0\r\n\r\n");
        }
        let r = c.response();
        assert_eq!(r.status, 404, "{framing}");
        // Far below the head timeout a wait for more body would end at, with
        // room for a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{framing}: {:?}",
            started.elapsed()
        );
    }
}

fn http10_closes_unless_keep_alive_is_asked(io: &str) {
    let s = start(io, &[]);
    let (responses, closed) =
        exchange(&s, b"GET /healthz HTTP/1.0\r\n\r\n", Duration::from_secs(3));
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].status, 200);
    assert_eq!(responses[0].header("connection"), Some("close"));
    assert!(closed, "HTTP/1.0 without keep-alive must close");

    let mut c = s.connect();
    for _ in 0..2 {
        c.write(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.response();
        assert_eq!(r.status, 200);
        // An HTTP/1.0 client only keeps the connection if told so.
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    c.assert_open(Duration::from_millis(200));
}

fn connection_close_is_honoured(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    // The pipelined request after the close is not answered.
    c.assert_closed(Duration::from_secs(3));
}

fn half_closed_client_still_gets_its_answers(io: &str) {
    let s = start(io, &[]);
    for tail in ["", "Connection: close\r\n"] {
        let mut c = s.connect();
        c.write(GET_HEALTHZ);
        c.write(format!("GET /missing HTTP/1.1\r\nHost: t\r\n{tail}\r\n").as_bytes());
        // Done sending: `printf ... | nc -N` and many scripts end their requests like this.
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let (raw, closed) = c.read_to_close(Duration::from_secs(3));
        let statuses: Vec<u16> = parse_responses(&raw).iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 404], "tail {tail:?}");
        assert!(closed, "tail {tail:?}: not closed after the client's FIN");
    }
    // A large answer is flushed whole before the close.
    let mut c = s.connect();
    c.write(
        format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{}\r\n", s.auth_line())
            .repeat(64)
            .as_bytes(),
    );
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (raw, closed) = c.read_to_close(Duration::from_secs(3));
    let responses = parse_responses(&raw);
    assert_eq!(responses.len(), 64);
    assert!(responses.iter().all(|r| r.status == 200));
    assert!(closed);

    // The request and the FIN in one segment, on a connection already in use:
    // a single readiness event reports both.
    let mut c = s.connect();
    c.write(GET_HEALTHZ);
    assert_eq!(c.response().status, 200);
    set_cork(&c, true);
    c.write(GET_HEALTHZ);
    // With the data held back by the cork, the FIN is sent on the same segment.
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (raw, closed) = c.read_to_close(Duration::from_secs(3));
    assert_eq!(parse_responses(&raw).len(), 1);
    assert!(closed, "the FIN that came with the request was missed");
    s.assert_healthy();
}

/// Sets TCP_CORK: written data is held until uncorked (or a FIN flushes it).
fn set_cork(c: &Client, on: bool) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt with a valid int option on our own socket.
    let rc = unsafe {
        libc::setsockopt(
            c.stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_CORK: {}", std::io::Error::last_os_error());
}

fn head_gets_length_without_body(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nHEAD /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.head_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("2"));
    let r = c.head_response();
    assert_eq!(r.status, 404);
    assert!(r.header("content-length").is_some_and(|n| n != "0"));
    // No body bytes follow either head.
    c.write(GET_HEALTHZ);
    let r = c.response();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
}

fn expect_continue_gets_100_before_the_answer(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let interim = c.response();
    assert_eq!(interim.status, 100);
    // Nothing else until the body is sent.
    c.assert_open(Duration::from_millis(200));
    c.write(b"hello");
    let r = c.response();
    assert_eq!(r.status, 404);
    r.assert_json_error("not_found");
    c.write(GET_HEALTHZ);
    assert_eq!(c.response().status, 200);
}

fn chunked_extensions_and_trailers_are_accepted(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    c.write(
        concat!(
            "POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5;name=value;flag;quoted=\"a \\\"b\\\" c\"\r\nhello\r\n",
            "A ; spaced = ext\r\n0123456789\r\n",
            "0;last\r\nX-Trailer: one\r\nChecksum: abc\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .as_bytes(),
    );
    assert_eq!(c.response().status, 404);
    let r = c.response();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    c.assert_open(Duration::from_millis(100));
}

fn malformed_heads_are_400_and_close(io: &str) {
    let s = start(io, &[]);
    let cases: &[&[u8]] = &[
        b"GET /healthz\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\nHost: t\n\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Nul: a\0b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Long: a\r\n  folded\r\n\r\n",
        b"G(T /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /healthz http/1.1\r\nHost: t\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        // RFC 9112 3.2: HTTP/1.1 needs exactly one Host, and it must be a host.
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
    ];
    for case in cases {
        assert_rejected(&s, case, 400, "bad_request");
    }
    // HTTP/1.0 may leave Host out.
    let r = parse_responses(&s.send(b"GET /healthz HTTP/1.0\r\n\r\n"));
    assert_eq!((r[0].status, r[0].body.as_slice()), (200, &b"ok"[..]));
}

fn unsupported_versions_are_505(io: &str) {
    let s = start(io, &[]);
    for version in ["HTTP/1.2", "HTTP/3.0", "HTTP/2.0", "HTTP/0.9"] {
        let req = format!("GET /healthz {version}\r\nHost: t\r\n\r\n");
        assert_rejected(&s, req.as_bytes(), 505, "http_version_not_supported");
    }
}

fn oversized_heads_are_431(io: &str) {
    let s = start(io, &[]);
    let mut big = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    big.resize(big.len() + 70 * 1024, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    assert_rejected(&s, &big, 431, "head_too_large");

    // Just under the limit is fine.
    let mut fits = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    fits.resize(60 * 1024, b'a');
    fits.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let (responses, _) = exchange(&s, &fits, Duration::from_secs(3));
    assert_eq!(responses.first().map(|r| r.status), Some(200));

    let mut many = b"GET /healthz HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 0..100 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_rejected(&s, &many, 431, "too_many_headers");
}

fn oversized_body_is_413_without_waiting_for_it(io: &str) {
    let s = start(io, &["--body-bytes-max", "1024"]);
    for head in [
        &b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n"[..],
        b"POST /f/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n",
    ] {
        let mut c = s.connect();
        let started = Instant::now();
        c.write(head);
        c.write(&[b'x'; 100]);
        let r = c.response();
        // Far below the 10 s head timeout a wait for the body would end at,
        // with room for a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "413 took {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, 413);
        r.assert_json_error("payload_too_large");
        assert_eq!(r.header("connection"), Some("close"));
        c.assert_closed(Duration::from_secs(3));
    }
    // A chunked body is cut off once its chunks add up to more than the limit.
    let mut chunked =
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    chunked.extend_from_slice(b"200\r\n");
    chunked.extend_from_slice(&[b'x'; 0x200]);
    chunked.extend_from_slice(b"\r\n201\r\n");
    assert_rejected(&s, &chunked, 413, "payload_too_large");
    // Exactly the limit is accepted.
    let mut exact =
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n"
            .to_vec();
    exact.extend_from_slice(&[b'x'; 1024]);
    let (responses, closed) = exchange(&s, &exact, Duration::from_secs(3));
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].status, 404);
    assert!(closed);
}

fn ambiguous_framing_is_400(io: &str) {
    let s = start(io, &[]);
    let cases: &[&[u8]] = &[
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /nope HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for case in cases {
        assert_rejected(&s, case, 400, "bad_request");
    }
    // Repeating the same length is not ambiguous.
    let (responses, _) = exchange(
        &s,
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        Duration::from_secs(3),
    );
    assert_eq!(responses.first().map(|r| r.status), Some(404));
}

fn unknown_transfer_coding_is_501(io: &str) {
    let s = start(io, &[]);
    for coding in ["gzip", "gzip, chunked", "chunked, chunked", "identity"] {
        let req = format!(
            "POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n"
        );
        assert_rejected(&s, req.as_bytes(), 501, "unsupported_transfer_encoding");
    }
}

const TIMEOUTS: &[&str] = &["--head-timeout-ms", "300", "--keepalive-timeout-ms", "500"];

/// How late a timer may fire, or a reaction come, on a loaded machine. Far below
/// what a broken timer would take here (the default timeouts are 10 s and 60 s;
/// a slowloris that could extend its deadline would drip for 7 s).
const SLACK_MAX: Duration = Duration::from_secs(3);

fn partial_head_times_out_with_408(io: &str) {
    let s = start(io, TIMEOUTS);
    let mut c = s.connect();
    let started = Instant::now();
    c.write(b"GET /healthz HTTP/1.1\r\nHo");
    let r = c.response();
    let waited = started.elapsed();
    assert_eq!(r.status, 408);
    r.assert_json_error("request_timeout");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        waited >= Duration::from_millis(250) && waited < SLACK_MAX,
        "408 after {waited:?}"
    );
    c.assert_closed(Duration::from_secs(3));

    // A body that stops arriving is a 408 too.
    let mut c = s.connect();
    c.write(b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(c.response().status, 408);
    c.assert_closed(Duration::from_secs(3));
    s.assert_healthy();
}

fn idle_keep_alive_connection_is_closed(io: &str) {
    let s = start(io, TIMEOUTS);
    let mut c = s.connect();
    // Timed from before the request: the server's idle time starts once it
    // has answered, which may be well before this thread reads the answer on
    // a loaded machine (so the test, timing from its read, saw a short idle).
    let asked = Instant::now();
    c.write(GET_HEALTHZ);
    assert_eq!(c.response().status, 200);
    c.assert_closed(Duration::from_secs(3));
    let idle = asked.elapsed();
    assert!(
        idle >= Duration::from_millis(400) && idle < SLACK_MAX,
        "closed after {idle:?} idle"
    );
    // A connection that never sends anything is idle from the start (timed
    // from before the connect: the server may accept it before connect returns).
    let opened = Instant::now();
    let mut c = s.connect();
    c.assert_closed(Duration::from_secs(3));
    assert!(opened.elapsed() >= Duration::from_millis(400));
}

fn slowloris_gets_408_at_the_head_deadline(io: &str) {
    let s = start(io, TIMEOUTS);
    let c = s.connect();
    let mut writer = c.stream.try_clone().unwrap();
    let started = Instant::now();
    let drip = std::thread::spawn(move || {
        use std::io::Write;
        let head =
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut c = c;
    let r = c.response();
    let waited = started.elapsed();
    assert_eq!(r.status, 408);
    assert!(
        waited < SLACK_MAX,
        "trickled bytes extended the deadline: 408 after {waited:?}"
    );
    c.assert_closed(Duration::from_secs(5));
    drip.join().unwrap();
    s.assert_healthy();
}

fn connections_over_the_limit_get_503(io: &str) {
    let s = start(io, &["--connections-per-core-max", "2", "--cores", "1"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = s.connect();
        c.write(GET_HEALTHZ);
        assert_eq!(c.response().status, 200);
        held.push(c);
    }
    let mut third = s.connect();
    let (raw, closed) = third.read_to_close(Duration::from_secs(3));
    let responses = parse_responses(&raw);
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(responses[0].status, 503);
    responses[0].assert_json_error("too_many_connections");
    assert_eq!(responses[0].header("retry-after"), Some("1"));
    assert!(closed);
    // The held connections are unaffected.
    for c in &mut held {
        c.write(GET_HEALTHZ);
        assert_eq!(c.response().status, 200);
    }
    drop(held);
    // Slots free up once the server has seen the closes.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = s.connect();
        c.write(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: t\r\n{}Connection: close\r\n\r\n",
                s.auth_line()
            )
            .as_bytes(),
        );
        let (raw, _) = c.read_to_close(Duration::from_secs(3));
        let r = parse_responses(&raw);
        if r.first().map(|r| r.status) == Some(200) {
            let text = r[0].text();
            assert!(metric_sum(&text, "hearth_shed_connections_total", "") >= 1);
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ten_thousand_requests_on_one_connection(io: &str) {
    let s = start(io, &[]);
    let mut c = s.connect();
    let batch: Vec<u8> = GET_HEALTHZ.repeat(100);
    for round in 0..100 {
        c.write(&batch);
        for i in 0..100 {
            let r = c.response();
            assert_eq!(r.status, 200, "request {}", round * 100 + i);
            assert_eq!(r.body, b"ok");
        }
    }
    c.assert_open(Duration::from_millis(50));
}

fn thousand_concurrent_connections(io: &str) {
    const N: usize = 1000;
    let limit = raise_nofile(N as u64 + 512);
    assert!(
        limit >= N as u64 + 64,
        "open-file limit {limit} is too low for this test"
    );
    // Start the server under the common default soft limit: it must raise its own.
    let s = start_with(io, &["--cores", "2"], |cmd| {
        // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                lim.rlim_cur = 256;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    });
    let mut clients: Vec<Client> = (0..N).map(|_| s.connect()).collect();
    for c in &mut clients {
        c.write(GET_HEALTHZ);
    }
    for c in &mut clients {
        let r = c.response();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
    // All of them are still open, plus the one asking.
    let text = s.get("/metrics").text();
    assert_eq!(
        metric_sum(&text, "hearth_open_connections", ""),
        N as u64 + 1
    );
    drop(clients);
    s.assert_healthy();
}

fn running_out_of_descriptors_pauses_accepts_then_recovers(io: &str) {
    const FILES_MAX: u64 = 64;
    let s = start_with(io, &["--cores", "1"], |cmd| {
        // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: FILES_MAX,
                    rlim_max: FILES_MAX,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    });
    // Twice the limit: however the accepts and the test's own timing
    // interleave on a loaded machine, some connections cannot be taken.
    let mut clients: Vec<Client> = (0..FILES_MAX * 2).map(|_| s.connect()).collect();
    for c in &mut clients {
        c.write(GET_HEALTHZ);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A loaded machine may not have answered any yet: wait for a first answer
    // (those beyond the limit wait anyway, as the answered keep their
    // descriptors).
    let answered_yet = |c: &Client| {
        c.stream.set_nonblocking(true).unwrap();
        let got = c.stream.peek(&mut [0u8; 1]).is_ok();
        c.stream.set_nonblocking(false).unwrap();
        got
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !clients.iter().any(answered_yet) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Those that got a descriptor are answered; the rest wait in the backlog.
    let mut waiting = Vec::new();
    let mut answered = 0;
    let mut closed = 0;
    for c in clients {
        c.stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        if let Ok(n) = c.stream.peek(&mut byte) {
            answered += 1;
            closed += usize::from(n == 0);
        } else {
            c.stream.set_nonblocking(false).unwrap();
            waiting.push(c);
        }
    }
    assert!(
        answered > 0 && !waiting.is_empty(),
        "answered {answered} (closed unanswered: {closed}) of {}\n{}",
        FILES_MAX * 2,
        s.stderr()
    );
    // Closing the answered connections frees descriptors; the rest are then
    // served, each closed once answered so that those behind it get one too
    // (more wait than the server has descriptors for).
    for mut c in waiting {
        let r = c.response();
        assert_eq!(r.status, 200);
    }
    s.assert_healthy();
    // The failing accepts are reported, but not in a loop.
    let reports = s.stderr().matches("Too many open files").count();
    assert!((1..=10).contains(&reports), "{reports} accept error lines");
}

fn sigterm_drains_and_refuses_new_connections(io: &str) {
    let mut s = start(io, &["--shutdown-grace-ms", "1000"]);
    let addr = s.addr;
    let mut idle = s.connect();
    idle.write(GET_HEALTHZ);
    assert_eq!(idle.response().status, 200);
    let mut partial = s.connect();
    partial.write(b"GET /healthz HTTP/1.1\r\nHo");
    std::thread::sleep(Duration::from_millis(100));

    let signalled = Instant::now();
    s.signal(libc::SIGTERM);
    // An idle keep-alive connection is closed at once.
    idle.assert_closed(SLACK_MAX);
    // The listeners close: new connections are refused, not queued.
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // A busy machine may drop the SYN; try again.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("connect during drain: {e}"),
            Ok(_) => {}
        }
        assert!(
            signalled.elapsed() < SLACK_MAX,
            "still accepting connections {:?} after SIGTERM",
            signalled.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = s.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        s.stderr()
    );
    assert!(
        took < Duration::from_millis(1000) + SLACK_MAX,
        "exit took {took:?} with a 1000 ms grace period"
    );
    // The half-read request was cut off when the grace period ended.
    let (_, closed) = partial.read_to_close(Duration::from_secs(1));
    assert!(closed);
}
