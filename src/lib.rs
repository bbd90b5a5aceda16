//! hearth: a self-hosted, Lambda-compatible serverless runtime.
//!
//! Walking the data path of one invocation top-down:
//! - [`engine`]: thread-per-core event loops (io_uring, or epoll through mio) that accept,
//!   read and write connections; [`engine::conn`] drives one HTTP connection.
//! - [`http`]: request parsing and framing ([`http::parse`]), the one owned answer type
//!   ([`http::reply`]) and response writing.
//! - [`routes`]: maps a request to the health/metrics endpoints, the control plane or a function.
//! - [`functions`]: the function registry and each core's scheduler ([`functions::sched`], sans-IO).
//! - [`sandbox`]: backends that create instances (process, qemu).
//! - [`runtime`]: the runtime root (Node.js, the guest agent, the shim) every backend runs.
//! - [`protocol`]: the frames exchanged with the guest agent inside each instance.
//! - [`control`]: the control plane: deploy (archive checks, multipart), durable state, and
//!   the Lambda service API (`aws lambda …`, SigV4).
//! - [`guest`]: kernel and image builders for the microVM backends.
//! - [`bench`]: `hearth bench`, the HTTP load generator and its charts (a client; no part
//!   of the server).
//!
//! Near-leaves that every layer may use: [`spec`] (a function's settings as plain data;
//! it imports only [`runtime::RuntimeKind`]) and [`util`] (randomness, hex, epoch time,
//! CPU pinning, program lookup; it imports nothing else of the crate).

pub mod bench;
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
