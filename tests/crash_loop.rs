//! Crash loop: 50 rounds of kill -9 at a random moment while a client deploys,
//! invokes and deletes functions, each followed by an immediate restart on the
//! same port and state dir. After every restart: `GET /healthz` answers within
//! 1 s of the spawn, every function whose deploy was acknowledged (201) and not
//! deleted is listed and served, every acknowledged delete stuck, nothing
//! half-deployed is visible (listed = whole directories on disk, no staging or
//! trash left). At the end, after a clean SIGTERM: no cgroups, sandbox
//! processes or mounts of any of the servers, no temporary files in the state
//! dir.
//!
//! The kill moments come from a seeded RNG; the seed is printed, and
//! `CRASH_LOOP_SEED=<n>` replays a run. Needs root and the static guest agent;
//! without them the test prints why and returns.

mod common;
mod supervise;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dir_entries, temp_dir, zip_fixture};
use supervise::{control, invoke, leftovers_of, listed, mounts_under, request, Hearth};

const ROUNDS: usize = 50;
/// A restarted server must answer `GET /healthz` this soon after its spawn.
const HEALTHY_WITHIN: Duration = Duration::from_secs(1);
/// The kill comes at a uniformly random moment up to this long into a round's
/// traffic (a deploy of the small fixture takes a few hundred ms in a debug
/// build), or up to twice the first deploy's time if that is longer (a
/// contended machine; at most 2 s), so that deploys are both cut and completed.
const KILL_WITHIN_MS: u64 = 800;
/// Functions alive at once (more would only slow each restart's checks).
const FUNCTIONS_MAX: usize = 4;

/// xorshift64*: small, seeded, good enough to pick moments and operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the client knows about the functions, from the answers it got.
#[derive(Default)]
struct Model {
    /// Deploy acknowledged (201), delete not acknowledged.
    live: BTreeSet<String>,
    /// Delete acknowledged (200).
    gone: BTreeSet<String>,
    /// Delete sent, no answer (the server died): either outcome is fine.
    deleting: BTreeSet<String>,
    /// Deploys sent without an answer: up to this many unknown functions may appear.
    unanswered_deploys: usize,
    /// Answers that break the contract, reported at the end of the round.
    violations: Vec<String>,
    /// Deploys, invocations and deletes answered.
    answered: [usize; 3],
    /// Deploys, invocations and deletes cut by the kill (sent, no answer).
    cut: [usize; 3],
}

/// True when the request reached a server that then died (not a refused connect
/// after the kill, which never reached anything).
fn was_cut(e: &std::io::Error) -> bool {
    e.kind() != std::io::ErrorKind::ConnectionRefused
}

/// One client operation against the running server; records its outcome.
fn operate(addr: SocketAddr, zip: &[u8], model: &Mutex<Model>, rng: &mut Rng) {
    let (n_live, pick) = {
        let m = model.lock().unwrap();
        let ids: Vec<String> = m.live.difference(&m.deleting).cloned().collect();
        let pick = (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize].clone());
        (m.live.len(), pick)
    };
    // 40 % invocations, 30 % deletes, 30 % deploys (deletes instead when full).
    let roll = rng.below(10);
    match pick {
        Some(id) if roll < 4 => {
            let r = invoke(addr, &id);
            let mut m = model.lock().unwrap();
            match r {
                Ok(r) if r.status != 200 => m.violations.push(format!(
                    "invoke {id}: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )),
                Ok(_) => m.answered[1] += 1,
                Err(e) if was_cut(&e) => m.cut[1] += 1,
                Err(_) => {}
            }
        }
        Some(id) if roll < 7 || n_live >= FUNCTIONS_MAX => {
            model.lock().unwrap().deleting.insert(id.clone());
            let r = control(addr, "DELETE", &format!("/functions/{id}"), None, b"");
            let mut m = model.lock().unwrap();
            match r {
                Ok(r) if r.status == 200 => {
                    m.answered[2] += 1;
                    m.deleting.remove(&id);
                    m.live.remove(&id);
                    m.gone.insert(id);
                }
                Ok(r) => {
                    m.deleting.remove(&id);
                    m.violations.push(format!("delete {id}: {}", r.status));
                }
                // Never reached a server: nothing happened.
                Err(e) if !was_cut(&e) => {
                    m.deleting.remove(&id);
                }
                // No answer: stays in `deleting`, either outcome is fine.
                Err(_) => m.cut[2] += 1,
            }
        }
        _ => {
            model.lock().unwrap().unanswered_deploys += 1;
            let r = control(addr, "POST", "/deploy", Some("application/zip"), zip);
            let mut m = model.lock().unwrap();
            match r {
                Ok(r) if r.status == 201 => {
                    m.answered[0] += 1;
                    m.unanswered_deploys -= 1;
                    m.live
                        .insert(r.json()["functionId"].as_str().unwrap().to_string());
                }
                Ok(r) => {
                    m.unanswered_deploys -= 1;
                    m.violations.push(format!(
                        "deploy: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
                Err(e) if !was_cut(&e) => m.unanswered_deploys -= 1,
                Err(_) => m.cut[0] += 1,
            }
        }
    }
}

/// Checks a freshly restarted server against what the client was told, then
/// settles the uncertain outcomes (unanswered deploys and deletes).
/// Returns how long after its spawn the server answered `/healthz`.
fn check_restart(round: usize, h: &Hearth, state: &Path, model: &mut Model) -> Duration {
    let addr = h.addr;
    let healthy = supervise::until(h.spawned + HEALTHY_WITHIN, || {
        request(addr, "GET", "/healthz", &[], b"", HEALTHY_WITHIN).is_ok_and(|r| r.status == 200)
    });
    let healthy_after = h.spawned.elapsed();
    assert!(
        healthy,
        "round {round}: /healthz not 200 within {HEALTHY_WITHIN:?} of the spawn (listening after {:?}); log:\n{}",
        h.start_time,
        h.stderr()
    );
    let disk = dir_entries(&state.join("functions"));
    let list = listed(addr);
    assert_eq!(
        disk, list,
        "round {round}: on disk vs listed (no staging/trash may remain after start-up)"
    );
    let listed_set: BTreeSet<String> = list.iter().cloned().collect();
    for id in &model.live {
        assert!(
            listed_set.contains(id) || model.deleting.contains(id),
            "round {round}: acknowledged {id} is gone; log:\n{}",
            h.stderr()
        );
    }
    for id in &model.gone {
        assert!(
            !listed_set.contains(id),
            "round {round}: deleted {id} is back"
        );
    }
    let unknown: Vec<&String> = listed_set
        .iter()
        .filter(|id| !model.live.contains(*id))
        .collect();
    assert!(
        unknown.len() <= model.unanswered_deploys,
        "round {round}: {unknown:?} appeared, only {} deploy(s) went unanswered",
        model.unanswered_deploys
    );
    // Settle: whatever is listed now is whole and must serve.
    model.live = listed_set;
    model.deleting.clear();
    model.unanswered_deploys = 0;
    for id in &model.live {
        let r = invoke(addr, id);
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 200),
            "round {round}: {id} not served: {r:?}; log:\n{}",
            h.stderr()
        );
    }
    healthy_after
}

/// Temporary names that must not survive in the state dir.
fn temporary_files(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".staging-") || name.starts_with(".trash-") || name.ends_with(".tmp") {
            out.push(e.path().display().to_string());
        }
        // Runtime roots are read-only copies of the host's files; skip them.
        if e.file_type().is_ok_and(|t| t.is_dir()) && !name.starts_with("runtime-") {
            temporary_files(&e.path(), out);
        }
    }
}

#[test]
fn fifty_kill_9_restarts_lose_nothing_acknowledged_and_leak_nothing() {
    require_sandbox!();
    let seed = std::env::var("CRASH_LOOP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash loop seed: {seed} (replay with CRASH_LOOP_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = temp_dir("crash-loop");
    let (state, log) = (dir.join("state"), dir.join("stderr.log"));
    let zip = Arc::new(zip_fixture("plain"));
    let started = Instant::now();

    let mut h = Hearth::start("127.0.0.1:0", &state, &log, &[]);
    let listen = h.addr.to_string();
    let mut pids = vec![h.pid];
    let model = Arc::new(Mutex::new(Model::default()));
    let t = Instant::now();
    operate(h.addr, &zip, &model, &mut rng);
    let kill_within_ms = (2 * t.elapsed().as_millis() as u64).clamp(KILL_WITHIN_MS, 2_000);
    eprintln!(
        "first deploy took {:?}; kills within {kill_within_ms} ms",
        t.elapsed()
    );
    let (mut slowest_listen, mut slowest_healthy) = (Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        // Traffic on a thread; the kill comes at a random moment of it.
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let (stop, model, zip, addr) = (stop.clone(), model.clone(), zip.clone(), h.addr);
            let mut rng = Rng(rng.next() | 1);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    operate(addr, &zip, &model, &mut rng);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.below(kill_within_ms)));
        h.kill9();
        stop.store(true, Ordering::Relaxed);
        client.join().expect("client thread");
        {
            let m = model.lock().unwrap();
            assert!(
                m.violations.is_empty(),
                "round {round}: {:?}; log:\n{}",
                m.violations,
                h.stderr()
            );
        }
        h = Hearth::try_start(&listen, &state, &log, &[])
            .unwrap_or_else(|e| panic!("round {round}: restart failed:\n{e}"));
        pids.push(h.pid);
        let healthy_after = check_restart(round, &h, &state, &mut model.lock().unwrap());
        slowest_listen = slowest_listen.max(h.start_time);
        slowest_healthy = slowest_healthy.max(healthy_after);
    }
    assert!(
        h.term(),
        "the last server did not exit cleanly:\n{}",
        h.stderr()
    );
    let m = model.lock().unwrap();
    eprintln!(
        "crash loop: {ROUNDS} rounds in {:?}; answered: {} deploys, {} invocations, {} deletes; \
         cut by the kill: {} deploys, {} invocations, {} deletes; {} functions live, {} deleted; \
         slowest restart: listening after {slowest_listen:?}, /healthz 200 after {slowest_healthy:?}",
        started.elapsed(),
        m.answered[0],
        m.answered[1],
        m.answered[2],
        m.cut[0],
        m.cut[1],
        m.cut[2],
        m.live.len(),
        m.gone.len()
    );

    // Nothing of any server remains.
    for &pid in &pids {
        let (groups, procs) = leftovers_of(pid, Duration::from_secs(2));
        assert!(
            groups.is_empty() && procs.is_empty(),
            "server {pid} left cgroups {groups:?} and processes {procs:?}"
        );
    }
    let launchers = supervise::orphaned_hearth_processes();
    assert!(launchers.is_empty(), "hearth processes left: {launchers:?}");
    let mounts = mounts_under(&dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let mut temps = Vec::new();
    temporary_files(&state, &mut temps);
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    let disk: BTreeSet<String> = dir_entries(&state.join("functions")).into_iter().collect();
    assert_eq!(
        disk, m.live,
        "function directories vs the functions that live"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
