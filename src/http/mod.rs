//! HTTP/1.1: request parsing and body framing ([`parse`]), the owned answer
//! type ([`reply`]) and writing it to the wire ([`response`]); the AWS
//! event-stream framing of streamed service API answers ([`eventstream`]).
pub mod eventstream;
pub mod parse;
pub mod reply;
pub mod response;
