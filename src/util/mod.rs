//! Small helpers with no knowledge of hearth: they depend on `std` and `libc` only and never
//! on another module of this crate, so any layer may use them without creating an import cycle.
//!
//! - [`program`]: finding an executable (an environment override, else `PATH`).

pub mod program;
