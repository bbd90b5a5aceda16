//! Restarts as a supervisor does them (systemd `Restart=always`): kill -9 and
//! start again at once on the same port and state dir; and SIGTERM at awkward
//! moments, after which nothing of the server may remain.
//!
//! Needs root and the static guest agent; without them each test prints why
//! and returns.

mod common;
mod supervise;

use std::time::{Duration, Instant};

use common::{temp_dir, zip_fixture};
use supervise::{deploy, invoke, leftovers_of, request, until, Hearth};

/// How soon a restarted server must serve its functions (on a quiet machine;
/// see `serve_budget`).
const SERVE_WITHIN: Duration = Duration::from_secs(1);

/// The time a server restarted after kill -9 gets to serve its functions:
/// [`SERVE_WITHIN`], or on a machine so contended that a clean restart (the
/// same start-up and cold starts, without a dead server's listeners to wait
/// out) took longer, 3 times that clean restart.
fn serve_budget(clean_restart: Duration) -> Duration {
    // After kill -9 the successor also shares the CPU with the sweep of the dead
    // server's sandboxes, which a clean restart does not have.
    SERVE_WITHIN.max(clean_restart * 3)
}

fn healthy(addr: std::net::SocketAddr) -> bool {
    request(addr, "GET", "/healthz", &[], b"", Duration::from_secs(1))
        .is_ok_and(|r| r.status == 200)
}

#[test]
fn a_server_killed_with_sigkill_restarts_at_once_on_its_port() {
    require_sandbox!();
    let dir = temp_dir("restart");
    let (state, log) = (dir.join("state"), dir.join("stderr.log"));
    let mut h = Hearth::start("127.0.0.1:0", &state, &log, &[]);
    let addr = h.addr;
    // (id, the status its handler answers with)
    let fns = [
        (
            deploy(addr, &zip_fixture("plain")).expect("deploy plain"),
            200,
        ),
        (
            deploy(addr, &zip_fixture("callback")).expect("deploy callback"),
            201,
        ),
    ];
    let serves = |addr| {
        fns.iter()
            .all(|(id, status)| invoke(addr, id).is_ok_and(|r| r.status == *status))
    };
    assert!(serves(addr));
    // The yardstick: a clean restart (SIGTERM, start, both functions served).
    assert!(h.term(), "clean exit; log:\n{}", h.stderr());
    let mut pids = vec![h.pid];
    h = Hearth::start(&addr.to_string(), &state, &log, &[]);
    assert!(until(h.spawned + Duration::from_secs(30), || healthy(addr)
        && serves(addr)));
    let clean = h.spawned.elapsed();
    let budget = serve_budget(clean);
    eprintln!(
        "clean restart served both functions after {clean:?}; kill -9 restarts must within {budget:?}"
    );
    pids.push(h.pid);
    for round in 0..5 {
        h.kill9();
        // At once, on the same port and state dir, as a supervisor would.
        h = Hearth::try_start(&addr.to_string(), &state, &log, &[])
            .unwrap_or_else(|e| panic!("round {round}: restart failed:\n{e}"));
        let dead = *pids.last().unwrap();
        pids.push(h.pid);
        let deadline = h.spawned + budget;
        let served = until(deadline, || healthy(addr) && serves(addr));
        let served_after = h.spawned.elapsed();
        assert!(
            served,
            "round {round}: not serving both functions {served_after:?} after spawn (listening after {:?}); log:\n{}",
            h.start_time,
            h.stderr()
        );
        // The start-up sweep removes the dead server's sandboxes and cgroups,
        // though they may still have been dying at that moment.
        let (groups, procs) = leftovers_of(dead, Duration::from_secs(5));
        assert!(
            groups.is_empty() && procs.is_empty(),
            "round {round}: killed server {dead} left {groups:?} {procs:?}"
        );
        eprintln!(
            "round {round}: listening after {:?}, serving both functions after {served_after:?}",
            h.start_time
        );
    }
    assert!(h.term(), "clean exit; log:\n{}", h.stderr());
    // Earlier servers' cgroups are swept by their successors; the last one cleans its own.
    for pid in pids {
        let (groups, procs) = leftovers_of(pid, Duration::from_secs(2));
        assert!(
            groups.is_empty() && procs.is_empty(),
            "server {pid} left {groups:?} {procs:?}"
        );
    }
}

#[test]
fn a_live_foreign_listener_still_fails_start_up_at_once() {
    let dir = temp_dir("restart-foreign");
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = foreign.local_addr().unwrap().to_string();
    let t = Instant::now();
    let err = match Hearth::try_start(&addr, &dir.join("state"), &dir.join("stderr.log"), &[]) {
        Ok(_) => panic!("a second listener was allowed on {addr}"),
        Err(e) => e,
    };
    assert!(
        err.contains("already in use") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_right_after_a_cold_start_leaves_no_cgroups() {
    require_sandbox!();
    let dir = temp_dir("term-cold");
    let zip = zip_fixture("plain");
    let mut seed = std::process::id() as u64;
    let state = dir.join("state");
    for round in 0..10 {
        // One state dir (its runtime root is built once), no functions carried over.
        let _ = std::fs::remove_dir_all(state.join("functions"));
        let mut h = Hearth::start("127.0.0.1:0", &state, &dir.join("stderr.log"), &[]);
        let id = deploy(h.addr, &zip).expect("deploy");
        // The cold start takes the deploy's standby; a refill starts behind it.
        assert_eq!(invoke(h.addr, &id).unwrap().status, 200);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((seed >> 33) % 100));
        let pid = h.pid;
        let t = Instant::now();
        assert!(h.term(), "round {round}: unclean exit:\n{}", h.stderr());
        let (groups, procs) = leftovers_of(pid, Duration::ZERO);
        assert!(
            groups.is_empty() && procs.is_empty(),
            "round {round}: server {pid} left {groups:?} {procs:?}"
        );
        eprintln!(
            "round {round}: started in {:?}, stopped in {:?}",
            h.start_time,
            t.elapsed()
        );
    }
}
