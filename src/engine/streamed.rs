//! Streamed answers on client connections: the head goes out at once, the
//! body in chunks as the scheduler hands them over (`Transfer-Encoding:
//! chunked`; to an HTTP/1.0 client the body ends with the connection), the
//! end of the body or, for a failed stream, a connection closed before it.
//!
//! Back-pressure: once a client holds more than [`STREAM_OUT_BYTES_MAX`] of
//! unsent output, the channel of the instance feeding it is no longer read
//! until the client has taken everything; the instance's runtime then blocks
//! on its writes, which slows the handler down. So a slow client costs at
//! most this much plus one channel read of memory, never the whole stream.

use crate::engine::conn::{ConnState, ReplyTo};
use crate::engine::stream::Kind;
use crate::engine::worker::{Token, Worker};
use crate::functions::sched::InstId;
use crate::http::reply::Reply;
use crate::http::response::{self, is_bodiless, Persistence};
use crate::metrics::add;

/// Unsent bytes of a streamed answer above which its instance's channel is
/// no longer read (until the client has taken all of them).
pub const STREAM_OUT_BYTES_MAX: usize = 256 * 1024;

/// The state of a streamed answer on its connection.
#[derive(Debug)]
pub struct StreamOut {
    /// The body is written in chunks (else it ends when the connection closes).
    chunked: bool,
    /// The body is written at all (not for HEAD or a bodiless status).
    body: bool,
    /// The connection is kept after the answer.
    keep_alive: bool,
    /// The instance whose channel was paused for this client.
    paused: Option<InstId>,
}

impl Worker {
    /// The client at `to` if it still waits on its request.
    fn waiting_client(&self, to: ReplyTo) -> Option<Token> {
        match self.streams.get(to.token) {
            Some(s) if !s.dead => match &s.kind {
                Kind::Client(c)
                    if c.serial == to.serial && matches!(c.state, ConnState::Waiting { .. }) =>
                {
                    Some(to.token)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Writes the head of a streamed answer to the client at `to`.
    pub fn stream_head(&mut self, to: ReplyTo, head: &Reply) {
        let Some(tok) = self.waiting_client(to) else {
            return;
        };
        let draining = self.draining;
        let s = &mut self.streams[tok];
        let Kind::Client(c) = &mut s.kind else {
            unreachable!("a waiting client")
        };
        let ConnState::Waiting {
            head_only,
            keep_alive,
            announce_keep_alive,
            chunked_ok,
            stream,
            ..
        } = &mut c.state
        else {
            unreachable!("a waiting client")
        };
        if stream.is_some() {
            return;
        }
        let body = !*head_only && !is_bodiless(head.status);
        let keep_alive = *keep_alive && *chunked_ok && !head.close && !draining;
        let persistence = match (keep_alive, *announce_keep_alive) {
            (false, _) => Persistence::Close,
            (true, true) => Persistence::AnnounceKeepAlive,
            (true, false) => Persistence::KeepAlive,
        };
        *stream = Some(StreamOut {
            chunked: *chunked_ok,
            body,
            keep_alive,
            paused: None,
        });
        let before = s.wbuf.len();
        response::write_stream_head(
            &mut s.wbuf,
            &self.date,
            head.status,
            &head.headers,
            *chunked_ok,
            persistence,
        );
        self.metrics.count_status(head.status);
        self.queued_out(tok, before);
    }

    /// Writes the next bytes of the streamed answer at `to`; pauses instance
    /// `inst`'s channel when the client holds too much.
    pub fn stream_data(&mut self, to: ReplyTo, inst: Option<InstId>, data: &[u8]) {
        let Some(tok) = self.waiting_client(to) else {
            return;
        };
        let s = &mut self.streams[tok];
        let Some(out) = stream_out(&mut s.kind) else {
            return;
        };
        if !out.body {
            return;
        }
        let (chunked, paused) = (out.chunked, out.paused.is_some());
        let before = s.wbuf.len();
        match chunked {
            true => response::write_chunk(&mut s.wbuf, data),
            false => s.wbuf.extend_from_slice(data),
        }
        let pause = match inst {
            Some(inst) if !paused && s.out_pending() > STREAM_OUT_BYTES_MAX => {
                if let Some(out) = stream_out(&mut s.kind) {
                    out.paused = Some(inst);
                }
                Some(inst)
            }
            _ => None,
        };
        self.queued_out(tok, before);
        if let Some(inst) = pause {
            self.set_channel_paused(inst, true);
        }
    }

    /// Ends the streamed answer at `to` with `data`: with the body's end when
    /// `complete`, else by closing the connection once what was sent is out.
    pub fn stream_end(&mut self, to: ReplyTo, data: &[u8], complete: bool) {
        let Some(tok) = self.waiting_client(to) else {
            return;
        };
        let s = &mut self.streams[tok];
        let Kind::Client(c) = &mut s.kind else {
            unreachable!("a waiting client")
        };
        let ConnState::Waiting {
            stream: Some(out), ..
        } = &mut c.state
        else {
            return;
        };
        let before = s.wbuf.len();
        if out.body {
            match out.chunked {
                true => response::write_chunk(&mut s.wbuf, data),
                false => s.wbuf.extend_from_slice(data),
            }
            if complete && out.chunked {
                response::write_last_chunk(&mut s.wbuf);
            }
        }
        let keep = complete && out.keep_alive;
        let paused = out.paused.take();
        crate::engine::conn::release_input(&mut self.in_held, &self.shared.peers, c);
        c.state = ConnState::Idle;
        c.deadline = self.now + self.shared.cfg.http.keepalive_timeout;
        if !keep {
            s.closing = true;
        }
        self.queued_out(tok, before);
        if let Some(inst) = paused {
            self.set_channel_paused(inst, false);
        }
        self.process_client(tok);
    }

    /// The client at `tok` took all its output, or is going away: the channel
    /// its streamed answer paused is read again.
    pub fn stream_resume(&mut self, tok: Token) {
        let paused = match self.streams.get_mut(tok).map(|s| &mut s.kind) {
            Some(kind) => stream_out(kind).and_then(|out| out.paused.take()),
            None => None,
        };
        if let Some(inst) = paused {
            self.set_channel_paused(inst, false);
        }
    }

    /// Counts the bytes queued on `tok` since its output was `before` long.
    fn queued_out(&mut self, tok: Token, before: usize) {
        let now = self.now;
        let s = &mut self.streams[tok];
        let written = s.wbuf.len() - before;
        if s.out_counted == 0 {
            s.out_progress = Some(now);
        }
        s.out_counted += written;
        self.out_queued += written;
        add(&self.metrics.bytes_out, written as u64);
        self.mark(tok);
    }
}

/// The streamed answer under way on a client connection, if any.
fn stream_out(kind: &mut Kind) -> Option<&mut StreamOut> {
    match kind {
        Kind::Client(c) => match &mut c.state {
            ConnState::Waiting { stream, .. } => stream.as_mut(),
            _ => None,
        },
        Kind::Channel(_) | Kind::Rapi(..) => None,
    }
}
