//! Client connections that move to the core holding their function.
//!
//! A function limited to fewer instances than there are cores (concurrency 1
//! on two cores, typically) cannot have an instance where every connection
//! was accepted. Without moving anything, a request on a core without one
//! waits for an instance to be handed over ([`crate::functions::sched`]'s
//! `migrate`), and the instance shuttles between the cores in turns of a few
//! milliseconds. Instead, the connection of such a request moves, before the
//! request is dispatched, to a core that holds an instance
//! ([`crate::functions::CorePool::home_core`]): its socket, the parsed
//! request and any pipelined bytes travel in one message, and the target
//! core serves the request and the connection's later ones like its own.
//! The request is served entirely on one core, as every request is; only
//! the connection changed hands between two requests.
//!
//! A connection moves only between whole answers (nothing of an earlier
//! answer left to write), only to a core below its connection limit, and a
//! moved request is never moved again: a client that alternates between two
//! functions held on different cores moves at most once per request.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use crate::engine::conn::{waiting_on, Conn};
use crate::engine::phases::Track;
use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::{set_nonblocking, Msg, Token, Worker};
use crate::http::parse::Request;

/// A request that is to be served on another core, with its connection.
pub struct Moving {
    core: usize,
    id: String,
    path: String,
    req: Request,
    body: Vec<u8>,
}

/// A connection on its way to another core, with the request it carries.
pub struct MovedConn {
    fd: OwnedFd,
    peer: IpAddr,
    phases: Track,
    /// Bytes read after the request (pipelined ones), parsed on arrival.
    leftover: Vec<u8>,
    moving: Moving,
}

impl Worker {
    /// Whether the connection at `tok` can move to `core` now: not while an
    /// earlier answer is still being written, nor while this core shuts down,
    /// nor to a core at its connection limit.
    pub(crate) fn can_move(&self, tok: Token, core: usize) -> bool {
        let full = self.shared.core_metrics[core]
            .open_connections
            .load(Relaxed)
            >= self.shared.cfg.http.connections_per_core_max as u64;
        let s = &self.streams[tok];
        let busy = s.out_pending() > 0 || s.send_inflight || s.closing || s.dead;
        !full && !busy && !self.draining && matches!(s.kind, Kind::Client(_))
    }

    /// Moves the connection at `tok` (see [`Worker::can_move`]), whose
    /// request `req` for function `id` (at `path` within it) is complete and
    /// not yet dispatched, to `core`, where the request is served.
    pub(crate) fn move_connection(
        &mut self,
        tok: Token,
        core: usize,
        id: String,
        path: String,
        req: Request,
        body: Vec<u8>,
    ) {
        self.fns.connection_moved(&id);
        let s = &mut self.streams[tok];
        let Kind::Client(conn) = &mut s.kind else {
            unreachable!("can_move checked the kind")
        };
        conn.moving = Some(Box::new(Moving {
            core,
            id,
            path,
            req,
            body,
        }));
        // The driver stops its I/O on the socket and then calls `detached`.
        s.detaching = true;
        self.mark(tok);
    }

    /// A moving connection left this core's loop: send it on.
    pub(crate) fn client_detached(&mut self, s: Stream) {
        let Kind::Client(conn) = s.kind else {
            unreachable!("only client streams reach client_detached")
        };
        self.client_left();
        let Some(moving) = conn.moving else {
            return;
        };
        let moved = MovedConn {
            fd: s.fd,
            peer: conn.peer,
            phases: conn.phases,
            leftover: s.rbuf[s.rpos..].to_vec(),
            moving: *moving,
        };
        let core = moved.moving.core;
        self.shared
            .send(core, Msg::ConnectionMoved(Box::new(moved)));
    }

    /// A connection moved here from another core: serve its request.
    pub(crate) fn moved_in(&mut self, m: MovedConn) {
        set_nonblocking(m.fd.as_raw_fd());
        let Moving {
            id,
            path,
            req,
            body,
            ..
        } = m.moving;
        let serial = self.next_serial();
        let conn = Conn {
            serial,
            peer: m.peer,
            state: waiting_on(&req),
            deadline: self.now + self.shared.cfg.http.keepalive_timeout,
            phases: m.phases,
            moving: None,
        };
        let mut stream = Stream::new(m.fd, Kind::Client(conn));
        stream.push_input(&m.leftover);
        let tok = self.streams.insert(stream);
        self.client_joined();
        self.mark(tok);
        self.invoke_here(tok, id, path, req, body);
    }
}
