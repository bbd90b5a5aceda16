//! The agent's own diagnostics: one prefixed line per event on stderr, which
//! is the launcher's log in a process sandbox and `/dev/console` in a microVM.
//!
//! Output of the runtime never passes through here; it travels to the host as
//! LOG frames (see `output.rs`).

use std::fmt;
use std::io::Write;

/// Writes one diagnostic line; a closed or broken stderr is ignored, since the
/// agent must keep running without anyone reading its console.
pub fn line(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "hearth-agent: {args}");
}

/// `diag!("format", args...)`: one diagnostic line on stderr.
macro_rules! diag {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}
