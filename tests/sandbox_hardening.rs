//! What a deployed function can learn or change about its host, and what the host keeps
//! private from other local users: end to end, with the real server, real zips and real
//! process sandboxes.
//!
//! Needs root and the static guest agent (`tools/build-agent.sh`); the escape probe also needs
//! gcc with a static libc. Without them a test prints why and returns.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{deploy_ok, start_with_fixed_token as start, temp_dir, Server};

fn deploy_dir(s: &Server, dir: &Path, query: &str) -> String {
    deploy_ok(s, &hearth::cli::zip_dir(dir).expect("zip").0, query)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A function directory whose handler returns `{ env: process.env.SECRET }`.
fn secret_function() -> PathBuf {
    let dir = temp_dir("secret-fn");
    fs::write(
        dir.join("index.js"),
        "exports.handler = async () => ({ statusCode: 200, body: String(process.env.SECRET) });\n",
    )
    .unwrap();
    dir
}

/// `cat <path>` as the unprivileged `nobody`: true if it could read the file.
fn nobody_can_read(path: &Path) -> bool {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "cat",
        ])
        .arg(path)
        .output()
        .expect("run setpriv (util-linux)");
    out.status.success()
}

fn assert_private(state: &Path, id: &str) {
    let fdir = state.join("functions").join(id);
    let meta = fdir.join("meta.json");
    assert_eq!(mode(state), 0o700, "{}", state.display());
    assert_eq!(mode(&state.join("functions")), 0o700);
    assert_eq!(mode(&fdir), 0o700);
    assert_eq!(mode(&meta), 0o600);
    assert!(fs::read_to_string(&meta).unwrap().contains("s3cr3t"));
    assert!(
        !nobody_can_read(&meta),
        "another local user can read {}",
        meta.display()
    );
}

#[test]
fn function_secrets_on_disk_are_readable_by_root_only() {
    require_sandbox!();
    let s = start(&["--cores", "1"]);
    let code = secret_function();
    let id = deploy_dir(&s, &code, "env=%7B%22SECRET%22%3A%22s3cr3t%22%7D");
    assert_private(&s.dir.join("state"), &id);
    // The sandbox still reads its code through the 0700 directories.
    let r = s.connect().request("GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "s3cr3t"));
    let _ = fs::remove_dir_all(&code);
}

#[test]
fn a_state_dir_left_world_readable_is_tightened_at_start_up() {
    require_sandbox!();
    let base = temp_dir("loose-state");
    let state = base.join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let code = secret_function();
    let id = {
        let mut s = start(&["--cores", "1", "--state-dir", &state_arg]);
        let id = deploy_dir(&s, &code, "env=%7B%22SECRET%22%3A%22s3cr3t%22%7D");
        s.stop();
        id
    };
    // What an older hearth left: 0755 directories and a 0644 meta.json.
    let fdir = state.join("functions").join(&id);
    for d in [&state, &state.join("functions"), &fdir] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(fdir.join("meta.json"), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(nobody_can_read(&fdir.join("meta.json")));

    let s = start(&["--cores", "1", "--state-dir", &state_arg]);
    assert_private(&state, &id);
    let r = s.connect().request("GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "s3cr3t"));
    drop(s);
    let _ = fs::remove_dir_all(&base);
    let _ = fs::remove_dir_all(&code);
}

/// A static helper a function runs with `child_process`: Node has no affinity or vsock API.
/// It widens its CPU mask to every CPU and opens an AF_VSOCK socket, and prints JSON with
/// the errno of each (0 = it worked) and its `Cpus_allowed_list` before and after.
const ESCAPE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void cpus(char *out, size_t n) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[512];
    out[0] = 0;
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, "Cpus_allowed_list:", 18) == 0) {
            char *v = line + 18;
            while (*v == ' ' || *v == '\t') v++;
            v[strcspn(v, "\n")] = 0;
            snprintf(out, n, "%s", v);
        }
    }
    if (f) fclose(f);
}

int main(void) {
    char before[128], after[128];
    cpus(before, sizeof before);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int i = 0; i < CPU_SETSIZE; i++) CPU_SET(i, &all);
    int aff = sched_setaffinity(0, sizeof all, &all) == 0 ? 0 : errno;
    cpus(after, sizeof after);
    int vs = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0) >= 0 ? 0 : errno;
    int pk = socket(AF_PACKET, SOCK_RAW, 0) >= 0 ? 0 : errno;
    int in = socket(AF_INET, SOCK_STREAM, 0) >= 0 ? 0 : errno;
    /* memfd_secret (447), and a number newer than any the filter knows. */
    int secret = syscall(447, 0) >= 0 ? 0 : errno;
    int newer = syscall(600, 0) >= 0 ? 0 : errno;
    printf("{\"setaffinity\":%d,\"before\":\"%s\",\"after\":\"%s\",\"vsock\":%d,\"packet\":%d,\"inet\":%d,\"memfd_secret\":%d,\"newer\":%d}\n",
           aff, before, after, vs, pk, in, secret, newer);
    return 0;
}
"#;

const ESCAPE_JS: &str = r#"
const { execFileSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const size = f => { try { return fs.readFileSync(f).length; } catch (e) { return e.code; } };
const tryTo = f => { try { f(); return 0; } catch (e) { return e.code; } };
exports.handler = async () => {
  const probe = JSON.parse(execFileSync('/var/task/escape', { encoding: 'utf8' }));
  return {
    statusCode: 200,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      probe,
      hostname: os.hostname(),
      kallsyms: size('/proc/kallsyms'),
      cmdline: size('/proc/cmdline'),
      config: size('/proc/config.gz'),
      keys: size('/proc/keys'),
      timer_list: size('/proc/timer_list'),
      // The agent (PID 1) runs as the same uid: its memory must stay out of reach.
      agent_mem: tryTo(() => fs.closeSync(fs.openSync('/proc/1/mem', 'r+'))),
      // So must the sysctls of the sandbox's own namespaces.
      tcp_rmem: tryTo(() => fs.writeFileSync('/proc/sys/net/ipv4/tcp_rmem', '4096 131072 67108864')),
    }),
  };
};
"#;

#[test]
fn a_function_cannot_leave_its_core_open_vsock_or_read_host_proc_or_reach_its_agent() {
    require_sandbox!();
    let dir = temp_dir("escape-fn");
    fs::write(dir.join("escape.c"), ESCAPE_C).unwrap();
    let built = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(dir.join("escape"))
        .arg(dir.join("escape.c"))
        .output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipped: gcc -static failed (no static libc?): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: gcc is not available: {e}");
            return;
        }
    }
    fs::remove_file(dir.join("escape.c")).unwrap();
    fs::write(dir.join("index.js"), ESCAPE_JS).unwrap();

    let s = start(&["--cores", "1"]);
    let id = deploy_dir(&s, &dir, "");
    let r = s.connect().request("GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!(r.status, 200, "{} / stderr:\n{}", r.text(), s.stderr());
    let v = r.json();
    let p = &v["probe"];
    // The instance runs pinned to the core that owns it (cpu 0 with one core).
    assert_eq!(p["before"], "0", "{v}");
    assert_eq!(p["setaffinity"], libc::EPERM, "{v}");
    assert_eq!(
        p["after"], p["before"],
        "the function widened its CPU mask: {v}"
    );
    assert_eq!(p["vsock"], libc::EAFNOSUPPORT, "{v}");
    assert_eq!(p["packet"], libc::EAFNOSUPPORT, "{v}");
    assert_eq!(p["inet"], 0, "{v}");
    assert_eq!(v["hostname"], "localhost", "{v}");
    assert_eq!(p["memfd_secret"], libc::EPERM, "{v}");
    assert_eq!(p["newer"], libc::ENOSYS, "{v}");
    // (Where Yama restricts ptrace, EACCES would come from it as well.)
    assert_eq!(
        v["agent_mem"], "EACCES",
        "the agent's memory is writable: {v}"
    );
    assert_eq!(v["tcp_rmem"], "EROFS", "/proc/sys is writable: {v}");
    for f in ["kallsyms", "cmdline", "config", "keys", "timer_list"] {
        let host = match f {
            "config" => "/proc/config.gz".to_string(),
            f => format!("/proc/{f}"),
        };
        if Path::new(&host).exists() {
            assert_eq!(v[f], 0, "{host} must read as empty: {v}");
        }
    }
    let _ = fs::remove_dir_all(&dir);
}
