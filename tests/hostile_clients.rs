//! What an anonymous client or a hostile function author can do to the front
//! end, tried against the real server: pipelined answers that are never read,
//! slow bodies, connection floods from one address, a browser page driving the
//! control plane, and function answers meant to split or hijack a connection.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    control as call, deploy_fixture, metric_sum, parse_responses, rss_kib, Client, Server,
};

/// Deploys the `hostile` fixture; returns its id.
fn deploy_hostile(s: &Server, query: &str) -> String {
    deploy_fixture(s, "hostile", &format!("handler=index.handler&{query}"))
}

/// A connection whose receive buffer is tiny, so the server's answers back up.
fn connect_small_window(s: &Server) -> TcpStream {
    common::connect_v4(s.addr, None, Some(4096))
}

fn metrics(s: &Server) -> String {
    s.get("/metrics").text()
}

/// Waits until `cond` holds or `limit` passes; returns whether it held.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

#[test]
fn a_slow_download_outlives_the_keep_alive_timeout() {
    require_sandbox!();
    // A 6 MB answer read at ~3 MB/s takes ~2 s: four keep-alive timeouts.
    let s = Server::start(&["--cores", "1", "--keepalive-timeout-ms", "500"]);
    let id = deploy_hostile(&s, "");
    let mut c = common::connect_v4(s.addr, None, Some(64 * 1024));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /f/{id}/big HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|h| got.len() >= h + 4 + 6_000_000) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    assert!(got.len() > 6_000_000, "{} bytes in {took:?}", got.len());
    let r = parse_responses(&got);
    assert_eq!(r.len(), 1, "{} bytes in {took:?}", got.len());
    assert_eq!(r[0].body.len(), 6_000_000, "cut off after {took:?}");
    assert!(
        took > Duration::from_secs(1),
        "not slow enough to test: {took:?}"
    );
    // A client that stops reading is still closed after the timeout.
    write!(c, "GET /f/{id}/big HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(
        rest.len() < 6_000_000,
        "a stalled reader got all {} bytes",
        rest.len()
    );
}

#[test]
fn pipelined_answers_wait_for_a_client_that_does_not_read() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1"]);
    let id = deploy_hostile(&s, "");
    let get = format!("GET /f/{id}/big HTTP/1.1\r\nHost: t\r\n\r\n");
    // Warm the instance and settle the allocator before measuring.
    assert_eq!(
        call(&s, "GET", &format!("/f/{id}/big"), &[], b"")
            .body
            .len(),
        6_000_000
    );
    let before = rss_kib(s.pid());
    let mut c = connect_small_window(&s);
    c.write_all(get.repeat(40).as_bytes()).unwrap();
    // The server answers what it may, then stops parsing this connection.
    std::thread::sleep(Duration::from_secs(4));
    let queued = metric_sum(&metrics(&s), "hearth_out_queued_bytes", "");
    let grown_mib = rss_kib(s.pid()).saturating_sub(before) / 1024;
    // One connection holds at most its 8 MiB bound plus the answer that crossed
    // it; before the fix all 40 answers (240 MB) were queued.
    assert!(
        queued <= 16_000_000,
        "{queued} bytes queued for one connection"
    );
    assert!(grown_mib < 64, "server grew by {grown_mib} MiB");
    // The client can still read everything, in order.
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = Vec::new();
    while got.len() < 40 * 6_000_000 {
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    // The heads of the 40 answers follow within a second.
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let rs = parse_responses(&got);
    assert_eq!(rs.len(), 40);
    assert!(rs
        .iter()
        .all(|r| r.status == 200 && r.body.len() == 6_000_000));
    drop(c);
    s.assert_healthy();
}

#[test]
fn clients_that_never_read_are_evicted_over_the_output_budget() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1", "--out-bytes-total-max", "16000000"]);
    let id = deploy_hostile(&s, "concurrency=2");
    let get = format!("GET /f/{id}/big HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut conns: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut c = connect_small_window(&s);
            c.write_all(get.repeat(3).as_bytes()).unwrap();
            c
        })
        .collect();
    // The per-connection bounds alone would let these six hold 12 answers (72 MB).
    // Over the 16 MB budget, those that do not read are closed once they stall.
    std::thread::sleep(Duration::from_secs(4));
    let m = metrics(&s);
    let queued = metric_sum(&m, "hearth_out_queued_bytes", "");
    assert!(
        queued <= 16_000_000 + 6_000_200,
        "{queued} bytes queued over a 16 MB budget"
    );
    // A loaded machine may not have made enough answers by then to stall
    // anyone: wait for the eviction rather than expect it within 4 s.
    let mut m = m;
    eventually(Duration::from_secs(30), || {
        m = metrics(&s);
        metric_sum(&m, "hearth_out_evicted_total", "") >= 1
    });
    assert!(metric_sum(&m, "hearth_out_evicted_total", "") >= 1, "{m}");
    // Everyone else is still served while that happens.
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    // An evicted reader sees the end of its connection.
    let closed = conns.iter_mut().any(|c| {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    });
    assert!(closed);
}

#[test]
fn function_answers_cannot_open_a_tunnel_or_smuggle_a_response() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy_hostile(&s, "");
    let mut c = s.connect();
    // 101 with an upgrade header: refused, the connection stays plain HTTP.
    for code in [101, 100, 103] {
        let r = c.request("GET", &format!("/f/{id}/status?code={code}"), &[], b"");
        assert_eq!(r.status, 502, "status {code}: {}", r.text());
        r.assert_json_error("bad_function_response");
        assert!(r.header("upgrade").is_none());
    }
    // 204 and 304 end at their head: the body that looks like a second response
    // is dropped, and the next pipelined answer is the real one.
    for code in [204, 304] {
        let mut raw = Vec::new();
        c.write(
            format!(
                "GET /f/{id}/status?code={code} HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            .as_bytes(),
        );
        let first = c.head_response();
        assert_eq!(first.status, code);
        assert!(first.header("content-length").is_none(), "{first:?}");
        assert!(first.header("upgrade").is_none() && first.header("connection").is_none());
        let second = c.response();
        raw.extend_from_slice(&second.body);
        assert_eq!((second.status, &raw[..]), (200, &b"ok"[..]), "code {code}");
    }
    // Invalid header names and values are left out and noted in the log.
    let r = c.request("GET", &format!("/f/{id}/headers"), &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "headers"));
    assert_eq!(r.header("x-fine"), Some("yes"));
    assert!(r.header("x-utf8").is_some());
    for bad in ["transfer-encoding", "bad name", "x-nul", "x-esc"] {
        assert!(
            r.headers.iter().all(|(k, _)| !k.starts_with(bad)),
            "{bad} in {:?}",
            r.headers
        );
    }
    assert_eq!(r.header("content-length"), Some("7"));
    let logs = call(&s, "GET", &format!("/functions/{id}/logs"), &[], b"").text();
    assert!(logs.contains("left out of the response"), "{logs}");
}

#[test]
fn the_control_plane_is_closed_by_default() {
    let s = Server::start(&[]);
    // A token was generated and stored where only root can read it.
    let file = s.dir.join("state/admin-token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let token = s.token.clone().expect("token generated");
    assert!(token.len() >= 32);
    // A browser page's multipart deploy (no preflight needed) is refused…
    let mut c = s.connect();
    let form = "--b\r\nContent-Disposition: form-data; name=\"code\"; filename=\"f.zip\"\r\n\r\nPK\r\n--b--\r\n";
    let r = c.request(
        "POST",
        "/deploy",
        &[
            ("origin", "http://evil.example"),
            ("content-type", "multipart/form-data; boundary=b"),
        ],
        form.as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    r.assert_json_error("forbidden_origin");
    // Without a browser's Origin, no token means 401.
    let r = s.connect().request("GET", "/functions", &[], b"");
    assert_eq!(r.status, 401);
    r.assert_json_error("unauthorized");
    // A foreign origin is refused even when it somehow carries the token.
    let bearer = format!("Bearer {token}");
    let r = s.connect().request(
        "GET",
        "/functions",
        &[
            ("origin", "http://evil.example"),
            ("authorization", &bearer),
        ],
        b"",
    );
    assert_eq!(r.status, 403);
    r.assert_json_error("forbidden_origin");
    assert_eq!(
        s.connect()
            .request("GET", "/functions", &[("authorization", &bearer)], b"")
            .status,
        200
    );
    // /metrics names every function: it needs the token too.
    assert_eq!(s.connect().request("GET", "/metrics", &[], b"").status, 401);
    assert_eq!(s.get("/metrics").status, 200);
    // Invocations and health stay public.
    assert_eq!(s.connect().request("GET", "/healthz", &[], b"").status, 200);

    // The CLI finds the token in ./state by itself.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["ls", "--server", &s.addr.to_string()])
        .current_dir(&s.dir)
        .env_remove("HEARTH_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_open_control_plane_is_loopback_only_and_refuses_rebinding() {
    let s = Server::start(&["--no-admin-token"]);
    assert!(!s.dir.join("state/admin-token").exists());
    let get = |host: &str| {
        let mut c = s.connect();
        c.write(format!("GET /functions HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        c.response()
    };
    assert_eq!(get(&s.addr.to_string()).status, 200);
    assert_eq!(get("localhost:3000").status, 200);
    let r = get("evil.example:3000");
    assert_eq!(r.status, 403);
    r.assert_json_error("forbidden_host");
    // Never without a token on an address others can reach.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--no-admin-token",
            "--state-dir",
        ])
        .arg(s.dir.join("other-state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--no-admin-token is refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_accept_a_separate_scrape_token() {
    let s = Server::start(&[
        "--admin-token",
        "admin-secret",
        "--metrics-token",
        "scrape-secret",
    ]);
    let get = |path: &str, token: &str| {
        s.connect()
            .request(
                "GET",
                path,
                &[("authorization", &format!("Bearer {token}"))],
                b"",
            )
            .status
    };
    assert_eq!(get("/metrics", "scrape-secret"), 200);
    assert_eq!(get("/metrics", "admin-secret"), 200);
    assert_eq!(get("/metrics", "wrong"), 401);
    assert_eq!(get("/functions", "scrape-secret"), 401);
}

#[test]
fn unauthorised_uploads_are_refused_on_their_head() {
    let s = Server::start(&[]);
    let mut c = s.connect();
    // A 40 MiB deploy that waits for `100 Continue`: it gets 401 at once instead,
    // and the connection closes without the body being read.
    c.write(
        b"POST /deploy HTTP/1.1\r\nHost: t\r\nContent-Type: application/zip\r\nExpect: 100-continue\r\nContent-Length: 41943040\r\n\r\n",
    );
    let (raw, closed) = c.read_to_close(Duration::from_secs(5));
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(closed);
    s.assert_healthy();
}

#[test]
fn a_trickling_body_is_cut_off() {
    let s = Server::start(&["--head-timeout-ms", "1000", "--body-rate-min", "100"]);
    let mut c = s.connect();
    c.write(b"POST /f/none HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n");
    // A byte every 400 ms: each read comes well within the 1 s gap, but the body
    // averages 2.5 bytes/s against a minimum of 100.
    let start = Instant::now();
    let mut answered = None;
    c.stream
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    while start.elapsed() < Duration::from_secs(6) {
        if !c.try_write(b"x") {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(n) = c.stream.read(&mut buf) {
            if n > 0 {
                answered = Some((
                    start.elapsed(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
            break;
        }
    }
    let (after, text) = answered.expect("the trickling body was never cut off");
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(after < Duration::from_secs(4), "cut off after {after:?}");
}

#[test]
fn one_address_cannot_take_every_connection() {
    let s = Server::start(&["--connections-per-ip-max", "8"]);
    let mut held: Vec<Client> = (0..8).map(|_| s.connect()).collect();
    for c in &mut held {
        c.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.response().status, 200);
    }
    let mut extra = s.connect();
    let (raw, closed) = extra.read_to_close(Duration::from_secs(3));
    let r = parse_responses(&raw);
    assert_eq!(r.first().map(|r| r.status), Some(503), "{raw:?}");
    r[0].assert_json_error("too_many_connections_from_address");
    assert!(closed);
    drop(held);
    // Slots come back once the server has seen the closes.
    assert!(eventually(Duration::from_secs(3), || {
        let mut c = s.connect();
        c.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let (raw, _) = c.read_to_close(Duration::from_secs(2));
        parse_responses(&raw).first().map(|r| r.status) == Some(200)
    }));
}

/// `X-Amz-Date` and credential-scope day for a SigV4 request made now.
fn amz_now() -> (String, String) {
    let stamp = hearth::control::sigv4::format_amz_date(std::time::SystemTime::now());
    let day = stamp[..8].to_string();
    (stamp, day)
}

/// The head of an anonymous service API request that looks signed: the
/// published access key id, a date `stamp`, a made-up signature.
fn forged_service_head(path: &str, stamp: &str, day: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nX-Amz-Date: {stamp}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=hearth/{day}/us-east-1/lambda/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature={}\r\n{extra}\r\n",
        "0".repeat(64)
    )
}

/// Sends `head` alone and returns the answer, asserting that it came without
/// `100 Continue` and that the connection closed.
fn refused_with(s: &Server, head: &str) -> (common::Response, String) {
    let mut c = s.connect();
    c.write(head.as_bytes());
    let (raw, closed) = c.read_to_close(Duration::from_secs(5));
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(closed, "the connection stayed open: {text}");
    assert!(!text.contains("100 Continue"), "{text}");
    let r = parse_responses(&raw)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    (r, text)
}

#[test]
fn bodies_of_unproven_clients_share_a_bounded_input_budget() {
    // One core, 16 MB for the bodies of clients the head does not prove.
    // (A long head timeout: the held bodies must not be cut off on a slow run.)
    let s = Server::start(&[
        "--cores",
        "1",
        "--in-bytes-total-max",
        "16000000",
        "--head-timeout-ms",
        "60000",
    ]);
    let post = |len: usize, extra: &str| {
        format!("POST /f/nobody HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {len}\r\n\r\n")
    };
    let shed = || metric_sum(&metrics(&s), "hearth_shed_input_total", "");
    let held_bytes = || metric_sum(&metrics(&s), "hearth_in_held_bytes", "");
    // Two function URL bodies of 6 MB, most of each sent: 12 MB held.
    let held: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = s.connect();
            c.write(post(6_000_000, "").as_bytes());
            c.write(&vec![b'x'; 5_000_000]);
            c
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || held_bytes() == 12_000_000));
    // A third that cannot fit is refused on its head: no `100 Continue`,
    // nothing read, 503.
    let (r, text) = refused_with(&s, &post(6_000_000, "Expect: 100-continue\r\n"));
    assert_eq!(r.status, 503, "{text}");
    r.assert_json_error("too_many_request_bodies");
    assert_eq!(r.header("retry-after"), Some("1"));
    // So is an anonymous service API request that looks signed (the access
    // key id is public; the signature can only be checked with the body).
    let (stamp, day) = amz_now();
    let (r, text) = refused_with(
        &s,
        &forged_service_head(
            "/2015-03-31/functions",
            &stamp,
            &day,
            "Expect: 100-continue\r\nContent-Length: 20000000\r\n",
        ),
    );
    assert_eq!(r.status, 503, "{text}");
    assert!(text.contains("ServiceException"), "{text}");
    // A service operation that carries neither code nor a payload takes a
    // small body only (413 before the budget is asked).
    let (r, text) = refused_with(
        &s,
        &forged_service_head(
            "/2015-03-31/functions/f/aliases",
            &stamp,
            &day,
            "Content-Length: 2000000\r\n",
        ),
    );
    assert_eq!(r.status, 413, "{text}");
    // A chunked body is charged as it grows, and refused once over.
    let mut chunked = s.connect();
    chunked.write(b"POST /f/nobody HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut framed = format!("{:x}\r\n", 5_000_000).into_bytes();
    framed.extend_from_slice(&vec![b'y'; 5_000_000]);
    let _ = chunked.try_write(&framed);
    let (raw, closed) = chunked.read_to_close(Duration::from_secs(5));
    let r = parse_responses(&raw);
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(r.first().map(|r| r.status), Some(503), "{text}");
    assert!(closed);
    // Heads hold little until their bodies come: thirty that announce 1.5 MB
    // (each would fit) are all let in, and a small body is still served.
    let shed_before = shed();
    let heads: Vec<Client> = (0..30)
        .map(|_| {
            let mut c = s.connect();
            c.write(post(1_500_000, "").as_bytes());
            c
        })
        .collect();
    // Each holds its first 64 KiB buffer, no more.
    let expect = 12_000_000 + 30 * 65_536;
    assert!(
        eventually(Duration::from_secs(5), || held_bytes() == expect),
        "held {} bytes, not {expect}",
        held_bytes()
    );
    assert_eq!(shed(), shed_before, "heads without bodies were refused");
    let r = s.connect().request("POST", "/f/nobody", &[], b"hello");
    assert_eq!(r.status, 404, "{}", r.text());
    // Requests without a body, and the admin's (proven on the head), are not
    // charged: a 5 MB deploy that is no zip is read and judged (400).
    s.assert_healthy();
    let junk = vec![b'z'; 5_000_000];
    let deploy = common::control(
        &s,
        "POST",
        "/deploy?handler=index.handler",
        &[("content-type", "application/zip")],
        &junk,
    );
    assert_eq!(deploy.status, 400, "{}", deploy.text());
    // Once the held bodies are gone the budget is whole again, and a body
    // larger than all of it gets in while the core holds no other: a forged
    // 20 MB chunked CreateFunction is read through and refused for its
    // signature (403), not for the budget.
    drop(held);
    drop(heads);
    assert!(eventually(Duration::from_secs(3), || held_bytes() == 0));
    let mut big = s.connect();
    big.write(
        forged_service_head(
            "/2015-03-31/functions",
            &stamp,
            &day,
            "Transfer-Encoding: chunked\r\n",
        )
        .as_bytes(),
    );
    for _ in 0..20 {
        let mut chunk = format!("{:x}\r\n", 1_000_000).into_bytes();
        chunk.extend_from_slice(&vec![b'{'; 1_000_000]);
        chunk.extend_from_slice(b"\r\n");
        big.write(&chunk);
    }
    big.write(b"0\r\n\r\n");
    let r = big.response();
    assert_eq!(r.status, 403, "{}", r.text());
    let m = metrics(&s);
    assert!(metric_sum(&m, "hearth_shed_input_total", "") >= 3, "{m}");
    // Every charge was given back (the gauge is refreshed each 100 ms tick).
    assert!(eventually(Duration::from_secs(3), || held_bytes() == 0));
}

#[test]
fn one_client_address_holds_at_most_its_share_of_the_input_budget() {
    // Two cores with room for many bodies, but 10 MB per client address
    // across both: what one client holds cannot shut the others out.
    let s = Server::start(&[
        "--cores",
        "2",
        "--in-bytes-total-max",
        "64000000",
        "--in-bytes-per-ip-max",
        "10000000",
        "--head-timeout-ms",
        "60000",
    ]);
    let head = "POST /f/nobody HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 6000000\r\n\r\n";
    let held_bytes = || metric_sum(&metrics(&s), "hearth_in_held_bytes", "");
    let from = |last: u8| common::Client::connect_from(s.addr, Ipv4Addr::new(127, 0, 0, last));
    // Waits for `100 Continue`: the body was let in.
    let continued = |c: &mut common::Client| {
        let mut got = [0u8; 25];
        c.stream.read_exact(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 100 Continue")
    };
    // Client .1 holds a 6 MB body, 5 MB of it sent.
    let mut first = from(1);
    first.write(head.as_bytes());
    assert!(continued(&mut first));
    first.write(&vec![b'x'; 5_000_000]);
    assert!(eventually(Duration::from_secs(10), || held_bytes() == 6_000_000));
    // Its second body would take it past its share (whichever core takes it).
    for _ in 0..4 {
        let mut again = from(1);
        again.write(head.as_bytes());
        let (raw, closed) = again.read_to_close(Duration::from_secs(5));
        let text = String::from_utf8_lossy(&raw);
        assert!(closed && !text.contains("100 Continue"), "{text}");
        let r = parse_responses(&raw).into_iter().next().expect("an answer");
        assert_eq!(r.status, 503, "{text}");
        r.assert_json_error("too_many_request_bodies");
    }
    // Another client is let in meanwhile.
    let mut other = from(2);
    other.write(head.as_bytes());
    assert!(continued(&mut other), "a second client was refused");
    other.write(&vec![b'y'; 6_000_000]);
    assert_eq!(other.response().status, 404);
    // Once client .1's body is gone, its share is whole again.
    drop(first);
    assert!(eventually(Duration::from_secs(3), || held_bytes() == 0));
    let mut again = from(1);
    again.write(head.as_bytes());
    assert!(continued(&mut again), "the share was not given back");
    again.write(&vec![b'z'; 6_000_000]);
    assert_eq!(again.response().status, 404);
    assert!(eventually(Duration::from_secs(3), || held_bytes() == 0));
    s.assert_healthy();
}

#[test]
fn a_stale_service_request_is_refused_before_its_body() {
    let s = Server::start(&[]);
    // A captured request replayed a day later: 403 on the head, body unread.
    let (r, text) = refused_with(
        &s,
        &forged_service_head(
            "/2015-03-31/functions/f/invocations",
            "20200101T000000Z",
            "20200101",
            "Expect: 100-continue\r\nContent-Length: 5000000\r\n",
        ),
    );
    assert_eq!(r.status, 403, "{text}");
    assert!(text.contains("Signature expired"), "{text}");
    s.assert_healthy();
}
