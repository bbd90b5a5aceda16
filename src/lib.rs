//! hearth: a self-hosted, Lambda-compatible serverless runtime.
//!
//! Walking the data path of one invocation top-down:
//! - [`engine`]: thread-per-core event loops (io_uring, or epoll through mio) that accept,
//!   read and write connections; [`engine::conn`] drives one HTTP connection.
//! - [`http`]: request parsing and framing ([`http::parse`]), the one owned answer type
//!   ([`http::reply`]) and response writing.
//! - [`routes`]: maps a request to the health/metrics endpoints, the control plane or a function.
//! - [`functions`]: the function registry and each core's scheduler ([`functions::sched`], sans-IO).
//! - [`sandbox`]: backends that create instances (process, qemu, firecracker).
//! - [`protocol`]: the frames exchanged with the guest agent inside each instance.
//! - [`control`]: deploy (archive checks, multipart), durable state.
//! - [`guest`]: kernel and image builders for the microVM backends.

pub mod cli;
pub mod config;
pub mod control;
pub mod doctor;
pub mod engine;
pub mod functions;
pub mod guest;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod routes;
pub mod sandbox;
