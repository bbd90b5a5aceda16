//! HTTP/1.1: request parsing and body framing ([`parse`]), the owned answer
//! type ([`reply`]) and writing it to the wire ([`response`]).
pub mod parse;
pub mod reply;
pub mod response;
