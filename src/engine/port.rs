//! Claiming the listen address at start-up.
//!
//! Our listeners use `SO_REUSEPORT`, which would let a second server silently
//! share the port and take half its connections, so start-up first checks that
//! nothing listens there. One holder is tolerated for a while: the listeners of
//! a server that was killed (kill -9, OOM killer). Its io_uring rings are torn
//! down asynchronously by the kernel, and the sockets they hold stay bound for
//! a few milliseconds or more after the process is gone. Such a socket has no
//! owner: no live process has a descriptor for it. So when the address is
//! taken, [`ensure_free`] looks the listener up in `/proc/net/tcp{,6}` and the
//! descriptor tables under `/proc`: a live owner fails start-up at once; an
//! ownerless listener is waited out, up to [`DEAD_LISTENER_WAIT`].
//!
//! The caller holds the state-dir lock before calling this, so a dying
//! listener cannot belong to a live server on the same state dir.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Longest wait for the listeners of a dead server to close.
pub const DEAD_LISTENER_WAIT: Duration = Duration::from_secs(5);
/// Pause between probes while waiting.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// `st` of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Fails when a live process listens on `addr`; waits (bounded) while only the
/// ownerless listeners of a dead process hold it.
pub fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let mut logged = false;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {
                if logged {
                    eprintln!(
                        "hearth: {addr} is free after {} ms",
                        started.elapsed().as_millis()
                    );
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
        if let Some(owner) = live_owner(addr) {
            return Err(in_use(
                addr,
                &format!("pid {owner} ({}) listens there", command_of(owner)),
            ));
        }
        if started.elapsed() >= DEAD_LISTENER_WAIT {
            return Err(in_use(
                addr,
                &format!(
                    "a listener without a live owner still held it after {} ms",
                    DEAD_LISTENER_WAIT.as_millis()
                ),
            ));
        }
        if !logged {
            logged = true;
            eprintln!(
                "hearth: {addr} is still held by the listeners of a stopped process; \
                 waiting up to {} ms for the kernel to close them",
                DEAD_LISTENER_WAIT.as_millis()
            );
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

fn in_use(addr: SocketAddr, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{addr} is already in use (another hearth serve or another server: {why})"),
    )
}

/// The pid of a live process holding a listening socket that conflicts with `addr`.
fn live_owner(addr: SocketAddr) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        inodes.extend(
            listeners(&text)
                .into_iter()
                .filter(|(a, _)| conflicts(*a, addr))
                .map(|(_, inode)| inode),
        );
    }
    if inodes.is_empty() {
        return None;
    }
    let links: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for proc_entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|l| links.iter().any(|s| l.as_os_str() == s.as_str()))
        });
        if holds && !exiting(pid) {
            return Some(pid);
        }
    }
    None
}

/// True for a process that is a zombie or being torn down (its descriptors are going).
fn exiting(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may itself hold ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    matches!(state, None | Some('Z' | 'X' | 'x'))
}

/// The command line of `pid`, for the error message.
fn command_of(pid: u32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .take(4)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if cmd.is_empty() {
        "?".into()
    } else {
        cmd.join(" ")
    }
}

/// Two bindings conflict when their ports match and their addresses are equal
/// or one of them is a wildcard (v4-mapped v6 addresses compare as v4).
fn conflicts(a: SocketAddr, b: SocketAddr) -> bool {
    let norm = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (x, y) = (norm(a.ip()), norm(b.ip()));
    a.port() == b.port() && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// Listening sockets (address, inode) of one /proc/net/tcp{,6} table.
fn listeners(table: &str) -> Vec<(SocketAddr, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                return None;
            }
            Some((parse_hex_addr(f[1])?, f[9].parse().ok()?))
        })
        .collect()
}

/// Decodes `0100007F:0BB8` (v4) or 32 hex digits `:port` (v6): the address is
/// printed as 32-bit words in host byte order.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0BB8 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 78 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn proc_net_tcp_yields_listeners_only() {
        let l = listeners(TCP);
        assert_eq!(l, vec![("127.0.0.1:3000".parse().unwrap(), 4242)]);
        let l6 = listeners(TCP6);
        assert_eq!(
            l6,
            vec![
                ("[::]:8080".parse().unwrap(), 77),
                ("[::1]:80".parse().unwrap(), 78)
            ]
        );
    }

    #[test]
    fn wildcards_and_mapped_addresses_conflict() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(conflicts(p("127.0.0.1:3000"), p("127.0.0.1:3000")));
        assert!(conflicts(p("0.0.0.0:3000"), p("127.0.0.1:3000")));
        assert!(conflicts(p("[::]:3000"), p("127.0.0.1:3000")));
        assert!(conflicts(p("[::ffff:127.0.0.1]:3000"), p("127.0.0.1:3000")));
        assert!(!conflicts(p("127.0.0.2:3000"), p("127.0.0.1:3000")));
        assert!(!conflicts(p("127.0.0.1:3001"), p("127.0.0.1:3000")));
    }

    #[test]
    fn a_live_listener_is_reported_at_once() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Instant::now();
        let e = ensure_free(addr).unwrap_err();
        // Not after waiting for a dead listener to go (that takes all of
        // DEAD_LISTENER_WAIT); the scan of /proc for the owner may take a
        // while on a loaded machine with many processes.
        assert!(t.elapsed() < DEAD_LISTENER_WAIT / 2, "{:?}", t.elapsed());
        assert!(
            e.to_string()
                .contains(&format!("pid {} ", std::process::id())),
            "{e}"
        );
        drop(l);
        ensure_free(addr).unwrap();
    }
}
