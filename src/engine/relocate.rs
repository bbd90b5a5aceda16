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
//! request, any pipelined bytes and what is left to write of its earlier
//! answers travel in one message, and the target core writes those and
//! serves the request and the connection's later ones like its own.
//! The request is served entirely on one core, as every request is; only
//! the connection changed hands between two requests.
//!
//! A connection takes the unwritten rest of its earlier answers along (up to
//! [`CARRY_MAX`]; with more it stays), never moves while the server shuts
//! down, and only to a core holding (with what is on its way there) under [`MOVE_ROOM`] of its
//! connection limit. A request that moved before it was dispatched is not
//! moved again at dispatch (a client that alternates between two functions
//! held on different cores moves at most once per request); a queued one
//! moves (the scheduler's `Action::Relocate`: after an instance handed to
//! another core, or spilled to an idle instance there, see
//! `functions::sched::spill`) at most `RELOCATIONS_MAX` times. Should the
//! target's loop have ended, the connection is served where it is.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::engine::conn::{Conn, ConnState, ReplyTo};
use crate::engine::phases::Track;
use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::{set_nonblocking, Invocation, Msg, Token, Worker};
use crate::functions::sched::Queued;
use crate::http::parse::Request;

/// The share of its connection limit (numerator, denominator) below which a
/// core takes connections moved from other cores: the rest stays for the
/// connections it accepts itself.
pub const MOVE_ROOM: (u64, u64) = (3, 4);

/// Bytes of earlier answers not yet written that a moving connection takes
/// along (they go out first on the new core); with more waiting, it stays.
pub const CARRY_MAX: usize = 64 * 1024;

/// A request that is to be served on another core, with its connection.
pub struct Moving {
    core: usize,
    cargo: Cargo,
}

/// What a moving connection carries.
enum Cargo {
    /// A request not yet dispatched: it invokes function `id`.
    Request {
        id: String,
        what: Invocation,
        req: Request,
        body: Vec<u8>,
    },
    /// A request queued in this core's scheduler, which follows the instance
    /// it waits for ([`crate::functions::sched::Action::Relocate`]).
    Queued(Queued),
}

/// A connection on its way to another core, with the request it carries.
pub struct MovedConn {
    fd: OwnedFd,
    peer: IpAddr,
    phases: Track,
    /// The connection's state (waiting for its answer).
    state: ConnState,
    /// Earlier answers not yet written, to go out first.
    unsent: Vec<u8>,
    /// Bytes read after the request (pipelined ones), parsed on arrival.
    leftover: Vec<u8>,
    /// The request's body charge ([`Conn::in_charge`]), taken over by the
    /// new core whatever its budget holds (the body is already in).
    in_charge: usize,
    moving: Moving,
}

impl Worker {
    /// Whether the connection at `tok` can move to `core` now, and if so
    /// reserves its place there: not with more than [`CARRY_MAX`] bytes of
    /// earlier answers still to write, nor while the server shuts down, nor
    /// once it is closing, and only while `core` holds
    /// (with the connections on their way to it) under [`MOVE_ROOM`] of its
    /// connection limit, so that it keeps room to accept its own.
    pub(crate) fn can_move(&self, tok: Token, core: usize) -> bool {
        let s = &self.streams[tok];
        let busy = s.out_pending() > CARRY_MAX || s.closing || s.dead;
        if busy
            || self.draining
            || self.shared.shutdown.load(Relaxed)
            || !matches!(s.kind, Kind::Client(_))
        {
            return false;
        }
        let max = self.shared.cfg.http.connections_per_core_max as u64;
        let room = (max * MOVE_ROOM.0 / MOVE_ROOM.1).max(1);
        let incoming = &self.shared.incoming[core];
        loop {
            // The target counts an arrival as open before it ends the
            // reservation (Release); reading the reservations first (Acquire)
            // never misses both.
            let n = incoming.load(Acquire);
            let open = self.shared.core_metrics[core]
                .open_connections
                .load(Relaxed);
            if open + n >= room {
                return false;
            }
            if incoming.compare_exchange(n, n + 1, AcqRel, Acquire).is_ok() {
                return true;
            }
        }
    }

    /// Moves the connection at `tok` (once [`Worker::can_move`] said yes), whose
    /// request `req` invoking function `id` is complete and not yet
    /// dispatched, to `core`, where the request is served.
    pub(crate) fn move_connection(
        &mut self,
        tok: Token,
        core: usize,
        id: String,
        what: Invocation,
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
            cargo: Cargo::Request {
                id,
                what,
                req,
                body,
            },
        }));
        // The driver stops its I/O on the socket and then calls `detached`.
        s.detaching = true;
        self.mark(tok);
    }

    /// Moves the connection waiting for `queued` to `core`, where the
    /// instance it waits for went; gives the request back to the scheduler
    /// when the connection cannot move (see [`Worker::can_move`]).
    pub(crate) fn relocate(&mut self, core: usize, queued: Queued) {
        let to = queued.to();
        let waiting = match self.streams.get(to.token).map(|s| &s.kind) {
            Some(Kind::Client(c)) => c.serial == to.serial && c.moving.is_none(),
            _ => false,
        };
        if !waiting {
            // The client left; the scheduler was told and has forgotten it.
            return;
        }
        if !self.can_move(to.token, core) {
            return self.fns.relocate_failed(queued, self.now);
        }
        self.fns.connection_moved(queued.function());
        let s = &mut self.streams[to.token];
        let Kind::Client(conn) = &mut s.kind else {
            unreachable!("checked above")
        };
        conn.moving = Some(Box::new(Moving {
            core,
            cargo: Cargo::Queued(queued),
        }));
        s.detaching = true;
        self.mark(to.token);
    }

    /// A moving connection left this core's loop: send it on (or, should
    /// that core's loop have ended, serve it here after all).
    pub(crate) fn client_detached(&mut self, s: Stream) {
        let unsent = s.unsent();
        let Kind::Client(conn) = s.kind else {
            unreachable!("only client streams reach client_detached")
        };
        self.client_left();
        // The charge on the core travels with the connection; its address's
        // charge (server-wide) stays as it is.
        self.in_held = self.in_held.saturating_sub(conn.in_charge);
        let Some(moving) = conn.moving else {
            self.shared.peers.release_input(conn.peer, conn.in_charge);
            self.shared.peers.close(conn.peer);
            return;
        };
        let moved = MovedConn {
            fd: s.fd,
            peer: conn.peer,
            phases: conn.phases,
            state: conn.state,
            unsent,
            leftover: s.rbuf[s.rpos..].to_vec(),
            in_charge: conn.in_charge,
            moving: *moving,
        };
        let core = moved.moving.core;
        if let Err(Msg::ConnectionMoved(back)) = self
            .shared
            .try_send(core, Msg::ConnectionMoved(Box::new(moved)))
        {
            self.shared.incoming[core].fetch_sub(1, Relaxed);
            self.adopt_moved(*back);
        }
    }

    /// A connection moved here from another core: serve its request.
    pub(crate) fn moved_in(&mut self, m: MovedConn) {
        self.adopt_moved(m);
        // Only now that the open count includes it does its reservation end.
        self.shared.incoming[self.core].fetch_sub(1, Release);
    }

    /// Takes connection `m` on and serves its request here.
    fn adopt_moved(&mut self, m: MovedConn) {
        set_nonblocking(m.fd.as_raw_fd());
        let serial = self.next_serial();
        let conn = Conn {
            serial,
            peer: m.peer,
            state: m.state,
            deadline: self.now + self.shared.cfg.http.keepalive_timeout,
            phases: m.phases,
            moving: None,
            in_charge: m.in_charge,
            unacked_seen: 0,
        };
        self.in_held += m.in_charge;
        let mut stream = Stream::new(m.fd, Kind::Client(conn));
        stream.push_input(&m.leftover);
        if !m.unsent.is_empty() {
            stream.out_counted = m.unsent.len();
            stream.out_progress = Some(self.now);
            self.out_queued += m.unsent.len();
            stream.wbuf = m.unsent;
        }
        let tok = self.streams.insert(stream);
        self.client_joined();
        self.mark(tok);
        match m.moving.cargo {
            Cargo::Request {
                id,
                what,
                req,
                body,
            } => {
                self.catch_up(&id);
                if !self.fns.serves(&id) {
                    // Gone while the request travelled: a code update replaced
                    // the function its name led to (this core may still drain
                    // it). Routed again, it finds the name's function now (or
                    // the 404 of a deleted one).
                    return self.dispatch(tok, req, body);
                }
                self.invoke_here(tok, id, what, req, body)
            }
            Cargo::Queued(queued) => {
                // The view first: a function live in it is published (no
                // lock on the way of every spilled request).
                if !self.fns.serves(queued.function()) {
                    // Replaced (or deleted) while the request travelled, or
                    // published after this core's view was taken: the view
                    // may lack the function now under its name, which serves
                    // it unless old instances here do.
                    let all = self.shared.functions.all();
                    self.fns.on_functions_changed(all, self.now);
                }
                let to = ReplyTo { token: tok, serial };
                self.fns.on_relocated(to, queued, self.now);
                self.run_actions();
            }
        }
    }
}
