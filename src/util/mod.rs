//! Small helpers with no knowledge of hearth: they depend on `std` and `libc` only and never
//! on another module of this crate, so any layer may use them without creating an import cycle.
//!
//! - [`cpu`]: pinning a thread to one CPU.
//! - [`crc`]: CRC-32 and CRC-32C checksums.
//! - [`decimal`]: integers as decimal digits without `format!`.
//! - [`hex`]: lower-case hex text of bytes.
//! - [`program`]: finding an executable (an environment override, else `PATH`).
//! - [`random`]: random bits from the kernel.
//! - [`sock`]: socket options of accepted connections.
//! - [`sys`]: pidfds and an epoll set, as checked calls.
//! - [`time`]: wall-clock time since the Unix epoch.

pub mod cpu;
pub mod crc;
pub mod decimal;
pub mod hex;
pub mod program;
pub mod random;
pub mod sock;
pub mod sys;
pub mod time;
