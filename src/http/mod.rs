//! HTTP/1.1: request parsing and body framing ([`parse`]), responses ([`response`]).
pub mod parse;
pub mod response;
