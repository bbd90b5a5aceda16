//! hearth-rapi: the Lambda Runtime API without I/O, in one place for every side that serves it.
//!
//! * `http` — the server half of HTTP/1.1 a runtime client needs: request heads, bodies
//!   (whole or streamed), answers.
//! * `api` — the API itself: routes under `/2018-06-01`, the runtime's environment from
//!   HELLO, INVOKE → the `/invocation/next` answer, and the runtime's posts → the metadata
//!   of RESPONSE, ERROR and INIT_ERROR frames.
//! * `session` — one instance's API as a state machine: frames and connection bytes in,
//!   frames, connection writes and the bootstrap's start out, through an `Io` the caller
//!   implements.
//!
//! Whoever serves the API (today the guest agent's `--runtime-api` mode) owns the sockets,
//! the bootstrap and the channel; these modules only turn bytes into decisions and back.

pub mod api;
pub mod http;
pub mod session;
