//! One HTTP answer as owned data ([`Reply`]), whoever decides it (the engine,
//! the scheduler, the control plane), up to the wire
//! ([`super::response::write`]); and [`ReplyTo`], the client connection an
//! answer decided away from it goes back to.
//!
//! A leaf: plain data that both the engine and the scheduler use, owned by neither.

use std::borrow::Cow;
use std::io::Write;

/// A header field. Names and values hearth sets itself are static, so they cost
/// no allocation; a handler's fields are owned.
pub type Header = (Cow<'static, str>, Cow<'static, str>);

/// An HTTP answer: status, header fields, body. `Server`, `Date`,
/// `Content-Length` and `Connection` are written by hearth, not listed here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header fields, in order.
    pub headers: Vec<Header>,
    /// The body (dropped on the wire for HEAD and bodiless statuses).
    pub body: Vec<u8>,
    /// Close the connection after this answer.
    pub close: bool,
}

impl Reply {
    /// An answer with a `content-type` and a body, keeping the connection.
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: vec![(Cow::Borrowed("content-type"), Cow::Borrowed(content_type))],
            body,
            close: false,
        }
    }

    /// A JSON error answer (see [`json_error`]).
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::new(status, "application/json", json_error(code, message))
    }

    /// The same answer with one more header field.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Reply {
        self.headers
            .push((Cow::Borrowed(name), Cow::Borrowed(value)));
        self
    }

    /// The same answer with one more header field whose value was computed.
    pub fn with_owned_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((Cow::Borrowed(name), Cow::Owned(value)));
        self
    }

    /// The same answer, closing the connection after it.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// A JSON error body: `{"error":"<message>","code":"<code>"}`.
pub fn json_error(code: &str, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + message.len());
    let _ = write!(
        v,
        "{}",
        serde_json::json!({ "error": message, "code": code })
    );
    v
}

/// Where an answer decided away from its connection is delivered: the engine's
/// stream token and the serial of the connection that asked (a reused stream
/// slot gets a new serial, so a late answer never reaches a newer client).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplyTo {
    /// The engine's stream token of the connection.
    pub token: usize,
    /// The connection's serial number on its core.
    pub serial: u64,
}
