//! Command-line flags (process sandbox) and the choice of mode.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::rapi::Kind;
use crate::runtime::RuntimeSpec;

/// Usage text for `--help`.
pub const USAGE: &str = "\
hearth-agent: PID 1 of a hearth instance. Starts the language runtime and
relays frames between it and the host (see include/hearth_protocol.h), or,
given --log-fd, hands the runtime the host's socket and only supervises.

USAGE
  hearth-agent --channel-fd <FD> [OPTIONS]   process sandbox: the launcher has
                                             built the namespaces and root fs
  /init (no arguments, as PID 1)             microVM: settings come from the
                                             kernel command line (hearth.*)

OPTIONS
  --channel-fd <FD>    connected stream socket to the host (required; >= 3).
                       End of file on it means the host is gone: the agent
                       stops the runtime and exits.
  --log-fd <FD>        direct mode: the runtime gets the channel itself as
                       fd 3 and speaks frames to the host without a relay;
                       the agent sends LOG frames for the runtime's raw
                       stdout/stderr (and its own notes) on this socket, and
                       end of file on it means the host is gone.
  --channel-out-fd <FD>
                       direct mode, Node.js: the channel is a pair of pipes
                       (cheaper than a socket per message): --channel-fd is
                       the read end of the host's, this (>= 5) the write end
                       of the one back; the runtime gets them as fds 3 and 4.
  --node <PATH>        Node.js binary              [default: /usr/bin/node]
  --shim <PATH>        runtime shim script         [default: /hearth/bootstrap.js]
  --cwd <DIR>          runtime working directory   [default: /var/task]
  --env <KEY=VALUE>    extra runtime environment variable (repeatable); the
                       base set is PATH, HOME, LANG, TZ, LAMBDA_TASK_ROOT
  --parallel-gc        Node.js: start it without --single-threaded-gc, so
                       V8 collects on helper threads too (for an instance
                       whose helpers hearth puts on another CPU)
  --runtime <KIND>     not Node.js: `provided` (/var/task/bootstrap) or
                       `python3`; the agent runs itself with --runtime-api
                       as the runtime on fd 3, which serves the Lambda
                       Runtime API on 127.0.0.1:9001 to that program
  --host-serves-api    with --runtime and --log-fd: hearth serves the
                       Runtime API itself; the agent binds 127.0.0.1:9001,
                       passes the listener and the program's stdout/stderr
                       sockets to the host, starts the program on HELLO and
                       reports its exit in an EXIT frame
  -h, --help           this text
  -V, --version        version and wire protocol version, which hearth
                       checks against its own before using this agent

The runtime gets the frame socket as fd 3, /dev/null as stdin, and pipes as
stdout/stderr; the agent turns their lines into LOG frames (tagged with the
request in flight when relaying; untagged in direct mode, where the shim
sends its console output as LOG frames itself).

EXIT STATUS (process sandbox)
  0  the host closed the channel, or SIGTERM/SIGINT asked for shutdown
  1  the runtime exited on its own
  2  bad usage, start-up failure, or a protocol error from the host
";

/// What the agent was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Serve a process sandbox over an inherited socket.
    Process {
        channel_fd: RawFd,
        /// Direct mode's log socket.
        log_fd: Option<RawFd>,
        /// Direct mode over pipes: the write end back to the host
        /// (`channel_fd` is then the read end of the host's pipe).
        channel_out_fd: Option<RawFd>,
        runtime: RuntimeSpec,
    },
    /// Boot a microVM from the kernel command line.
    Vm {
        ignored_args: Vec<String>,
    },
    /// `--runtime-api <kind>`: serve the Runtime API as the runtime on fd 3.
    RuntimeApi(Kind),
    Help,
    Version,
}

/// Picks the mode and parses flags. Without `--channel-fd`, PID 1 means a
/// microVM (the kernel may pass stray command-line words as arguments, which
/// are ignored); anywhere else it is a usage error.
pub fn parse(args: &[String], is_pid1: bool) -> Result<Command, String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    if args.iter().any(|a| a == "-V" || a == "--version") {
        return Ok(Command::Version);
    }
    if args.first().map(String::as_str) == Some("--runtime-api") {
        return match args {
            [_, kind] => Kind::parse(kind)
                .map(Command::RuntimeApi)
                .ok_or_else(|| format!("--runtime-api {kind:?}: expected provided or python3")),
            _ => Err("--runtime-api takes exactly one argument".to_string()),
        };
    }
    let has_channel = args
        .iter()
        .any(|a| a == "--channel-fd" || a.starts_with("--channel-fd="));
    if !has_channel {
        return if is_pid1 {
            Ok(Command::Vm {
                ignored_args: args.to_vec(),
            })
        } else {
            Err("--channel-fd is required (microVM mode only runs as PID 1)".to_string())
        };
    }
    let mut channel_fd = None;
    let mut log_fd = None;
    let mut channel_out_fd = None;
    let mut runtime = RuntimeSpec {
        node: PathBuf::from("/usr/bin/node"),
        shim: PathBuf::from("/hearth/bootstrap.js"),
        cwd: PathBuf::from("/var/task"),
        extra_env: Vec::new(),
        api: None,
        host_serves: false,
        parallel_gc: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag {
            "--channel-fd" | "--log-fd" | "--channel-out-fd" => {
                let v = value()?;
                let fd: RawFd = v
                    .parse()
                    .map_err(|_| format!("{flag} {v:?} is not a file descriptor number"))?;
                if fd < 3 {
                    return Err(format!(
                        "{flag} {fd}: fds 0-2 are stdio; pass the socket as 3 or above"
                    ));
                }
                match flag {
                    "--log-fd" => log_fd = Some(fd),
                    "--channel-out-fd" => channel_out_fd = Some(fd),
                    _ => channel_fd = Some(fd),
                }
            }
            "--node" => runtime.node = PathBuf::from(value()?),
            "--shim" => runtime.shim = PathBuf::from(value()?),
            "--cwd" => runtime.cwd = PathBuf::from(value()?),
            "--runtime" => {
                let v = value()?;
                runtime.api = Some(
                    Kind::parse(&v)
                        .ok_or_else(|| format!("--runtime {v:?}: expected provided or python3"))?,
                );
            }
            "--host-serves-api" if inline.is_none() => runtime.host_serves = true,
            "--parallel-gc" if inline.is_none() => runtime.parallel_gc = true,
            "--env" => {
                let v = value()?;
                match v.split_once('=') {
                    Some((k, val)) if !k.is_empty() => {
                        runtime.extra_env.push((k.to_string(), val.to_string()))
                    }
                    _ => return Err(format!("--env {v:?}: expected KEY=VALUE")),
                }
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    let channel_fd = channel_fd.expect("checked above");
    if runtime.parallel_gc && runtime.api.is_some() {
        return Err("--parallel-gc is for Node.js (not with --runtime)".to_string());
    }
    if runtime.host_serves && (runtime.api.is_none() || log_fd.is_none()) {
        return Err("--host-serves-api needs --runtime and --log-fd".to_string());
    }
    if log_fd == Some(channel_fd) {
        return Err(format!(
            "--log-fd {channel_fd} is the channel; it needs its own socket"
        ));
    }
    if let Some(out) = channel_out_fd {
        if log_fd.is_none() || runtime.api.is_some() {
            return Err("--channel-out-fd is for Node.js in direct mode (with --log-fd)".into());
        }
        // The runtime gets the pair as fds 3 and 4: a lower fd would be
        // overwritten while they are put there.
        if out < 5 || Some(out) == log_fd {
            return Err(format!(
                "--channel-out-fd {out}: needs its own fd, 5 or above"
            ));
        }
    }
    Ok(Command::Process {
        channel_fd,
        log_fd,
        channel_out_fd,
        runtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn process_mode_flags_are_read() {
        let cmd = parse(
            &args("--channel-fd 3 --log-fd=4 --node /n --shim=/s.js --cwd /code --env A=1 --env B=x=y"),
            true,
        )
        .unwrap();
        let Command::Process {
            channel_fd,
            log_fd,
            channel_out_fd,
            runtime,
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(channel_fd, 3);
        assert_eq!(log_fd, Some(4));
        assert_eq!(channel_out_fd, None);
        assert_eq!(runtime.node, PathBuf::from("/n"));
        assert_eq!(runtime.shim, PathBuf::from("/s.js"));
        assert_eq!(runtime.cwd, PathBuf::from("/code"));
        assert_eq!(runtime.api, None);
        assert_eq!(
            runtime.extra_env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn mode_follows_channel_flag_and_pid() {
        assert_eq!(
            parse(&[], true).unwrap(),
            Command::Vm {
                ignored_args: vec![]
            }
        );
        assert!(parse(&[], false).is_err());
        assert!(matches!(
            parse(&args("--channel-fd 7"), false).unwrap(),
            Command::Process {
                channel_fd: 7,
                log_fd: None,
                ..
            }
        ));
    }

    #[test]
    fn runtime_api_mode_and_flag() {
        assert_eq!(
            parse(&args("--runtime-api python3"), false).unwrap(),
            Command::RuntimeApi(Kind::Python3)
        );
        let Command::Process { runtime, .. } =
            parse(&args("--channel-fd 3 --runtime provided"), false).unwrap()
        else {
            panic!()
        };
        assert_eq!(runtime.api, Some(Kind::Provided));
    }

    #[test]
    fn node_may_collect_on_helper_threads() {
        for (line, parallel) in [
            ("--channel-fd 3", false),
            ("--channel-fd 3 --parallel-gc", true),
        ] {
            let Command::Process { runtime, .. } = parse(&args(line), false).unwrap() else {
                panic!("{line}")
            };
            assert_eq!(runtime.parallel_gc, parallel, "{line}");
            assert_eq!(
                runtime.describe().contains("--single-threaded-gc"),
                !parallel,
                "{line}"
            );
        }
        assert!(parse(
            &args("--channel-fd 3 --runtime python3 --parallel-gc"),
            false
        )
        .is_err());
    }

    #[test]
    fn a_pipe_pair_channel_is_read() {
        let cmd = parse(&args("--channel-fd 3 --log-fd 4 --channel-out-fd 5"), false).unwrap();
        assert!(matches!(
            cmd,
            Command::Process {
                channel_fd: 3,
                log_fd: Some(4),
                channel_out_fd: Some(5),
                ..
            }
        ));
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            "--channel-fd",
            "--channel-fd x",
            "--channel-fd 1",
            "--channel-fd 3 --env NOEQUALS",
            "--channel-fd 3 --frob",
            "--channel-fd 3 --log-fd 3",
            "--channel-fd 3 --log-fd 2",
            "--channel-fd 3 --runtime ruby",
            "--channel-fd 3 --channel-out-fd 5",
            "--channel-fd 3 --log-fd 4 --channel-out-fd 4",
            "--channel-fd 3 --log-fd 5 --channel-out-fd 5",
            "--channel-fd 3 --log-fd 4 --channel-out-fd 5 --runtime provided",
            "--runtime-api",
            "--runtime-api ruby",
            "--runtime-api python3 extra",
        ] {
            assert!(parse(&args(bad), false).is_err(), "{bad}");
        }
    }
}
