//! hearth: a self-hosted, Lambda-compatible serverless runtime.
//!
//! Walking the data path of one invocation top-down:
//! - [`engine`]: thread-per-core event loops (io_uring, or epoll through mio) that accept,
//!   read and write connections; [`engine::conn`] drives one HTTP connection.
//! - [`http`]: request parsing and framing ([`http::parse`]) and response writing.
//! - [`routes`]: maps a request to the health/metrics endpoints, the control plane or a function.
//! - [`functions`]: the function registry and each core's instance pools and scheduler.
//! - [`sandbox`]: backends that create instances (process, qemu).
//! - [`runtime`]: the runtime root (Node.js, the guest agent, the shim) every backend runs.
//! - [`protocol`]: the frames exchanged with the guest agent inside each instance.
//! - [`control`]: deploy (archive checks, multipart), durable state.
//! - [`guest`]: kernel and image builders for the microVM backends.
//!
//! Leaves that every layer may use and that import nothing else of the crate:
//! [`spec`] (a function's settings as plain data) and [`util`] (randomness, hex, epoch time,
//! CPU pinning, program lookup).

pub mod cli;
pub mod config;
pub mod control;
pub mod doctor;
pub mod engine;
pub mod functions;
pub mod guest;
pub mod http;
pub mod metrics;
pub mod routes;
pub mod runtime;
pub mod sandbox;
pub mod spec;
pub mod util;

/// The frames exchanged with the guest agent: the `hearth-protocol` crate, shared with it.
pub use hearth_protocol as protocol;
