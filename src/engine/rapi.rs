//! The Runtime API on the worker's own loop (process backend, runtimes other
//! than Node.js; see `sandbox::runtime_api`). An instance served this way has
//! no frame channel to the core: its streams are the listener on
//! 127.0.0.1:9001 of its sandbox, the runtime's connections, its stdout and
//! stderr, and the agent's channel (which only reports the runtime's exit).
//! A [`Session`] decides every answer; the frames it produces go to the
//! scheduler exactly as frames read from a channel would, and the scheduler's
//! INVOKE frames go to the session instead of a channel. So the request path
//! is: client → scheduler → session → the runtime's parked `/next`, and
//! `/response` → session → scheduler → client, all in one thread.
//!
//! Limits: [`hearth_rapi::session::CONNS_MAX`] connections per instance (more
//! are closed when accepted); request heads and bodies as the session bounds
//! them (`hearth_rapi::http`; responses over 6 MiB → 413); LOG frames of at
//! most [`runtime_api::LOG_CHUNK_BYTES`], rate-limited by the scheduler's log intake.

use std::io;
use std::os::fd::OwnedFd;

use hearth_rapi::session::{ConnId, Io, Session};
use slab::Slab;

use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::{set_nonblocking, Token, Worker};
use crate::functions::sched::{Frame, InstId};
use crate::protocol::{self, FrameDecoder, FrameType};
use crate::sandbox::runtime_api::{self, Served};
use crate::sandbox::Endpoint;
use crate::util::sock::set_linger_zero;

/// What one of an instance's Runtime API streams is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// 127.0.0.1:9001 in the sandbox: readiness means connections to accept.
    Listener,
    /// A runtime's connection, by the session's id.
    Conn(ConnId),
    /// The runtime's stdout (0) or stderr (1).
    Output(usize),
    /// The agent's channel: EXIT, then end of file.
    Agent,
}

/// One instance's Runtime API on this core.
pub struct Rapi {
    inst: InstId,
    session: Session,
    listener: Option<Token>,
    agent: Option<Token>,
    conns: Vec<Option<Token>>,
    output: [Option<Token>; 2],
    /// Frames for the scheduler, encoded, not yet taken.
    frames: Vec<u8>,
    decoder: FrameDecoder,
    /// The agent reported the runtime's exit.
    exited: bool,
    /// Reads of the runtime's connections are stopped while a streamed
    /// answer waits for a slow client ([`Worker::rapi_pause`]).
    stream_paused: bool,
    /// A detach in progress: what has come back from the driver so far.
    detach: Option<Parts>,
}

/// The fds of a detaching instance, collected as each stream leaves the loop.
#[derive(Default)]
struct Parts {
    listener: Option<OwnedFd>,
    channel: Option<OwnedFd>,
    conns: Vec<Option<OwnedFd>>,
    output: [Option<OwnedFd>; 2],
    channel_leftover: Vec<u8>,
    conn_unsent: Vec<(ConnId, Vec<u8>)>,
    /// Streams still to come back.
    waiting: usize,
}

/// The session's outputs on the loop: writes are queued on the connection's
/// stream (the driver sends them), frames collect for the scheduler.
struct CoreIo<'a> {
    streams: &'a mut Slab<Stream>,
    dirty: &'a mut Vec<Token>,
    conns: &'a mut Vec<Option<Token>>,
    frames: &'a mut Vec<u8>,
}

impl Io for CoreIo<'_> {
    fn frame(
        &mut self,
        kind: FrameType,
        flags: u8,
        id: u32,
        meta: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        protocol::encode(self.frames, kind, flags, id, meta, body);
        Ok(())
    }

    fn backlog(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(&Some(tok)) => self.streams.get(tok).map_or(0, Stream::out_pending),
            _ => 0,
        }
    }

    fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
        let Some(&Some(tok)) = self.conns.get(conn) else {
            return false;
        };
        match self.streams.get_mut(tok) {
            Some(s) if !s.dead => {
                s.wbuf.extend_from_slice(bytes);
                self.dirty.push(tok);
                true
            }
            _ => false,
        }
    }

    /// Closed once what was queued on it is written.
    fn close(&mut self, conn: ConnId) {
        let Some(slot) = self.conns.get_mut(conn) else {
            return;
        };
        if let Some(tok) = slot.take() {
            if let Some(s) = self.streams.get_mut(tok) {
                s.closing = true;
                self.dirty.push(tok);
            }
        }
    }

    fn spawn(
        &mut self,
        _kind: hearth_rapi::api::Kind,
        _f: &hearth_rapi::api::Function,
        _argv: &[String],
    ) -> io::Result<()> {
        Err(io::Error::other("the runtime is started by the agent"))
    }

    fn realtime_ms(&self) -> u64 {
        crate::util::time::unix_time_ms()
    }
}

impl Worker {
    /// Runs `f` on instance `inst`'s session with the loop as its [`Io`].
    fn with_session<T>(
        &mut self,
        inst: InstId,
        f: impl FnOnce(&mut Session, &mut CoreIo<'_>) -> T,
    ) -> Option<T> {
        let r = self.rapis.get_mut(inst.slot())?.as_mut()?;
        if r.inst != inst {
            return None;
        }
        let mut io = CoreIo {
            streams: &mut self.streams,
            dirty: &mut self.dirty,
            conns: &mut r.conns,
            frames: &mut r.frames,
        };
        Some(f(&mut r.session, &mut io))
    }

    fn rapi(&mut self, inst: InstId) -> Option<&mut Rapi> {
        self.rapis
            .get_mut(inst.slot())?
            .as_mut()
            .filter(|r| r.inst == inst)
    }

    /// Whether instance `inst` is served here through a Runtime API session.
    pub fn is_rapi(&self, inst: InstId) -> bool {
        matches!(self.rapis.get(inst.slot()), Some(Some(r)) if r.inst == inst)
    }

    /// Hands the session's frames to the scheduler.
    fn rapi_flush(&mut self, inst: InstId) {
        let now = self.now;
        let Some(r) = self.rapi(inst) else { return };
        // A moving instance's frames go with it to its next core.
        if r.frames.is_empty() || r.detach.is_some() {
            return;
        }
        let frames = std::mem::take(&mut r.frames);
        // The scheduler takes every whole frame while it knows the instance.
        let _ = self.fns.on_channel_input(inst, &frames, now);
        if let Some(r) = self.rapi(inst) {
            if r.frames.is_empty() {
                let mut frames = frames;
                frames.clear();
                r.frames = frames;
            }
        }
    }

    fn add_stream(&mut self, fd: OwnedFd, inst: InstId, role: Role) -> Token {
        set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&fd));
        let tok = self.streams.insert(Stream::new(fd, Kind::Rapi(inst, role)));
        self.mark(tok);
        tok
    }

    /// Takes an instance served by its Runtime API onto this core.
    pub fn attach_rapi(&mut self, inst: InstId, served: Served) {
        let Served {
            session,
            channel,
            listener,
            conns,
            output,
            frames,
            channel_leftover,
            conn_unsent,
        } = served;
        let mut r = Rapi {
            inst,
            session,
            listener: None,
            agent: None,
            conns: Vec::with_capacity(conns.len()),
            output: [None, None],
            frames,
            decoder: FrameDecoder::new(),
            exited: false,
            stream_paused: false,
            detach: None,
        };
        r.listener = Some(self.add_stream(listener, inst, Role::Listener));
        let agent = self.add_stream(channel, inst, Role::Agent);
        r.agent = Some(agent);
        for (k, o) in output.into_iter().enumerate() {
            r.output[k] = o.map(|fd| self.add_stream(fd, inst, Role::Output(k)));
        }
        for (i, c) in conns.into_iter().enumerate() {
            r.conns
                .push(c.map(|fd| self.add_stream(fd, inst, Role::Conn(i))));
        }
        for (i, bytes) in conn_unsent {
            if let Some(&Some(tok)) = r.conns.get(i) {
                self.streams[tok].wbuf = bytes;
            }
        }
        if self.rapis.len() <= inst.slot() {
            self.rapis.resize_with(inst.slot() + 1, || None);
        }
        self.rapis[inst.slot()] = Some(r);
        if !channel_leftover.is_empty() {
            self.rapi_agent_input(agent, inst, &channel_leftover);
        }
        // Requests read on the last core and not yet served (a `/next` that
        // arrived while the instance was leaving it).
        let open: Vec<ConnId> = self.rapi(inst).map_or(Vec::new(), |r| {
            (0..r.conns.len())
                .filter(|&i| r.conns[i].is_some())
                .collect()
        });
        for i in open {
            if let Some(Err(e)) = self.with_session(inst, |s, io| s.serve(io, i)) {
                eprintln!("hearth: worker {}: runtime api: {e}", self.core);
            }
        }
        self.rapi_flush(inst);
    }

    /// The scheduler sends instance `inst` a frame (an INVOKE).
    pub fn rapi_send(&mut self, inst: InstId, frame: Frame) {
        let done = self.with_session(inst, |s, io| {
            s.on_frame(io, frame.kind, frame.request_id, &frame.meta, frame.body)
        });
        if let Some(Err(e)) = done {
            eprintln!("hearth: worker {}: runtime api: {e}", self.core);
        }
        self.rapi_flush(inst);
    }

    /// A connection came in on instance `inst`'s listener (the driver accepted it).
    pub fn rapi_accepted(&mut self, listener: Token, fd: OwnedFd) {
        let Some(Kind::Rapi(inst, Role::Listener)) = self.streams.get(listener).map(|s| &s.kind)
        else {
            return;
        };
        let inst = *inst;
        let Some(r) = self.rapi(inst) else { return };
        let Some(i) = r.session.open() else {
            // Over the limit: dropping closes it.
            return;
        };
        if let Some(parts) = r.detach.as_mut() {
            // Accepted as the listener was leaving the loop: it goes along.
            if parts.conns.len() <= i {
                parts.conns.resize_with(i + 1, || None);
            }
            parts.conns[i] = Some(fd);
            return;
        }
        crate::util::sock::set_nodelay(std::os::fd::AsRawFd::as_raw_fd(&fd));
        let tok = self.add_stream(fd, inst, Role::Conn(i));
        let r = self.rapi(inst).expect("checked above");
        if r.conns.len() <= i {
            r.conns.resize(i + 1, None);
        }
        r.conns[i] = Some(tok);
    }

    /// Bytes arrived on one of instance `inst`'s streams.
    pub fn rapi_data(&mut self, tok: Token, inst: InstId, role: Role) {
        let input = {
            let s = &mut self.streams[tok];
            let v = s.input().to_vec();
            s.consume(v.len());
            v
        };
        match role {
            Role::Conn(i) => {
                if self
                    .rapi(inst)
                    .and_then(|r| r.conns.get(i).copied().flatten())
                    != Some(tok)
                {
                    return;
                }
                let served = self.with_session(inst, |s, io| {
                    s.received(i, &input);
                    s.serve(io, i)
                });
                if let Some(Err(e)) = served {
                    eprintln!("hearth: worker {}: runtime api: {e}", self.core);
                }
                self.rapi_pace(inst, tok);
            }
            Role::Output(k) => {
                let Some(r) = self.rapi(inst) else { return };
                let flags = if k == 1 { protocol::LOG_STDERR } else { 0 };
                let tag = r.session.log_tag();
                for chunk in input.chunks(runtime_api::LOG_CHUNK_BYTES) {
                    protocol::encode(&mut r.frames, FrameType::Log, flags, tag, &[], chunk);
                }
            }
            Role::Agent => self.rapi_agent_input(tok, inst, &input),
            Role::Listener => {}
        }
        self.rapi_flush(inst);
    }

    /// Frames from the agent: it sends EXIT (the runtime is gone) and nothing
    /// else. Anything else breaks the protocol: the agent is no longer the one
    /// hearth started (function code that took it over), so its channel is
    /// treated as closed and the instance fails.
    fn rapi_agent_input(&mut self, tok: Token, inst: InstId, bytes: &[u8]) {
        // Reads already under way when a broken channel was closed.
        if self.streams.get(tok).is_none_or(|s| s.dead) {
            return;
        }
        let Some(r) = self.rapi(inst) else { return };
        r.decoder.push(bytes);
        let (exits, broken) = agent_frames(&mut r.decoder);
        for message in exits {
            self.rapi_exit(inst, &message);
        }
        if let Some(why) = broken {
            eprintln!(
                "hearth: worker {}: instance {inst:?} broke the protocol on its agent channel: {why}",
                self.core
            );
            self.rapi_closed(tok, inst, Role::Agent);
            self.close_stream(tok);
        }
    }

    fn rapi_exit(&mut self, inst: InstId, message: &str) {
        match self.rapi(inst) {
            Some(r) if !r.exited => r.exited = true,
            _ => return,
        }
        let _ = self.with_session(inst, |s, io| s.on_exit(io, message));
        self.rapi_flush(inst);
    }

    /// One of instance `inst`'s streams ended (end of file or an error).
    pub fn rapi_closed(&mut self, tok: Token, inst: InstId, role: Role) {
        match role {
            Role::Conn(i) => {
                let mine = self
                    .rapi(inst)
                    .and_then(|r| r.conns.get(i).copied().flatten())
                    == Some(tok);
                if mine {
                    // A reset, not a FIN: the runtime's side closed first
                    // and would otherwise sit in TIME_WAIT.
                    set_linger_zero(self.streams[tok].raw());
                    let _ = self.with_session(inst, |s, io| s.closed(io, i));
                }
            }
            Role::Output(k) => {
                if let Some(r) = self.rapi(inst) {
                    if r.output[k] == Some(tok) {
                        r.output[k] = None;
                    }
                }
            }
            Role::Agent => {
                if self.rapi(inst).is_some_and(|r| r.agent == Some(tok)) {
                    self.rapi_exit(inst, "Runtime exited without providing a reason");
                    self.rapi_flush(inst);
                    let now = self.now;
                    self.fns.on_channel_closed(inst, &[], now);
                }
            }
            Role::Listener => {}
        }
        self.close_stream(tok);
        self.rapi_flush(inst);
    }

    /// Every stream of instance `inst`, mapped ones only.
    fn rapi_streams(r: &Rapi) -> Vec<Token> {
        r.listener
            .iter()
            .chain(r.agent.iter())
            .chain(r.output.iter().flatten())
            .chain(r.conns.iter().flatten())
            .copied()
            .collect()
    }

    /// The instance is gone: closes all its streams.
    pub fn rapi_close(&mut self, inst: InstId) {
        let Some(r) = self.rapi(inst) else { return };
        let streams = Self::rapi_streams(r);
        self.rapis[inst.slot()] = None;
        for tok in streams {
            self.close_stream(tok);
        }
    }

    /// Stops or resumes reading the runtime's connections (streamed answers
    /// to a slow client).
    pub fn rapi_pause(&mut self, inst: InstId, paused: bool) {
        let Some(r) = self.rapi(inst) else { return };
        r.stream_paused = paused;
        let conns: Vec<Token> = r.conns.iter().flatten().copied().collect();
        for tok in conns {
            self.rapi_pace(inst, tok);
        }
    }

    /// Reads connection `tok` of instance `inst` unless a streamed answer
    /// holds them all, or answers to it wait unsent past the session's
    /// [`hearth_rapi::session::BACKLOG_BYTES_MAX`] (a runtime that sends
    /// requests without reading the answers is then held back by its own
    /// socket, not buffered).
    fn rapi_pace(&mut self, inst: InstId, tok: Token) {
        let Some(held) = self.rapi(inst).map(|r| r.stream_paused) else {
            return;
        };
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        let pause = held || s.out_pending() > hearth_rapi::session::BACKLOG_BYTES_MAX;
        if s.read_paused != pause {
            s.read_paused = pause;
            self.mark(tok);
        }
    }

    /// Everything queued on runtime connection `tok` was written: requests
    /// the session left unserved for its backlog are served, and it is read again.
    pub fn rapi_flushed(&mut self, tok: Token, inst: InstId, i: ConnId) {
        // While the instance moves, its streams leave this loop one by one and
        // the session must not act on tokens already gone (the next core
        // serves every connection when it attaches them).
        let unread = match self.rapi(inst) {
            Some(r) if r.detach.is_none() && r.conns.get(i).copied().flatten() == Some(tok) => {
                r.session.has_unread(i)
            }
            _ => return,
        };
        if !unread {
            // Most sends end here: nothing was held back, reading goes on.
            return self.rapi_pace(inst, tok);
        }
        if let Some(Err(e)) = self.with_session(inst, |s, io| s.serve(io, i)) {
            eprintln!("hearth: worker {}: runtime api: {e}", self.core);
        }
        self.rapi_pace(inst, tok);
        self.rapi_flush(inst);
        self.run_actions();
    }

    /// Starts moving instance `inst` to another core: its streams leave the
    /// loop one by one ([`Worker::rapi_detached`]).
    pub fn rapi_detach(&mut self, inst: InstId) {
        let Some(r) = self.rapi(inst) else { return };
        let streams = Self::rapi_streams(r);
        r.detach = Some(Parts {
            waiting: streams.len(),
            ..Parts::default()
        });
        for tok in streams {
            self.streams[tok].detaching = true;
            self.mark(tok);
        }
    }

    /// A detaching stream of instance `inst` left the loop; the last one sends
    /// the instance on its way.
    pub fn rapi_detached(&mut self, s: Stream, inst: InstId, role: Role) {
        let Some(r) = self.rapi(inst) else { return };
        let Some(parts) = r.detach.as_mut() else {
            return;
        };
        let leftover = s.rbuf[s.rpos..].to_vec();
        let unsent = s.unsent();
        match role {
            Role::Listener => parts.listener = Some(s.fd),
            Role::Agent => {
                parts.channel = Some(s.fd);
                parts.channel_leftover = leftover;
            }
            Role::Output(k) => {
                parts.output[k] = Some(s.fd);
                let flags = if k == 1 { protocol::LOG_STDERR } else { 0 };
                for chunk in leftover.chunks(runtime_api::LOG_CHUNK_BYTES) {
                    protocol::encode(&mut r.frames, FrameType::Log, flags, 0, &[], chunk);
                }
            }
            Role::Conn(i) => {
                if parts.conns.len() <= i {
                    parts.conns.resize_with(i + 1, || None);
                }
                parts.conns[i] = Some(s.fd);
                if !unsent.is_empty() {
                    parts.conn_unsent.push((i, unsent));
                }
                if !leftover.is_empty() {
                    r.session.received(i, &leftover);
                }
            }
        }
        parts.waiting -= 1;
        if parts.waiting > 0 {
            return;
        }
        let r = self.rapis[inst.slot()].take().expect("checked above");
        let p = r.detach.expect("checked above");
        let (Some(listener), Some(channel)) = (p.listener, p.channel) else {
            return;
        };
        let served = Served {
            session: r.session,
            channel,
            listener,
            conns: p.conns,
            output: p.output,
            frames: r.frames,
            channel_leftover: p.channel_leftover,
            conn_unsent: p.conn_unsent,
        };
        self.fns
            .on_detached(inst, Endpoint::RuntimeApi(Box::new(served)), Vec::new());
    }

    /// Forgets every Runtime API stream at server exit.
    pub fn drop_rapis(&mut self) {
        for r in std::mem::take(&mut self.rapis).into_iter().flatten() {
            for tok in Self::rapi_streams(&r) {
                let _ = self.streams.try_remove(tok);
            }
        }
    }
}

/// Most bytes an agent channel may hold that do not make a whole frame: an
/// EXIT's message is a line of text.
const AGENT_PENDING_MAX: usize = 64 * 1024;

/// Takes the whole frames `decoder` holds from an agent channel: the EXIT
/// messages, and why the channel broke the protocol, if it did (a bad frame, a
/// frame other than EXIT, or more than [`AGENT_PENDING_MAX`] bytes pending).
fn agent_frames(decoder: &mut FrameDecoder) -> (Vec<String>, Option<String>) {
    let mut exits = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(f)) if f.kind == FrameType::Exit => {
                exits.push(String::from_utf8_lossy(&f.body).into_owned());
            }
            Ok(Some(f)) => return (exits, Some(format!("a {:?} frame", f.kind))),
            Err(e) => return (exits, Some(e.to_string())),
            Ok(None) if decoder.pending() > AGENT_PENDING_MAX => {
                let n = decoder.pending();
                return (exits, Some(format!("{n} bytes without a whole frame")));
            }
            Ok(None) => return (exits, None),
        }
    }
}

#[cfg(test)]
mod agent_tests {
    use super::*;

    #[test]
    fn an_agent_channel_carries_exits_only() {
        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        protocol::encode(&mut wire, FrameType::Exit, 0, 0, &[], b"exit status 1");
        d.push(&wire);
        assert_eq!(agent_frames(&mut d), (vec!["exit status 1".into()], None));
        // Any other frame, or bytes that are no frame, break the protocol.
        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        protocol::encode(&mut wire, FrameType::Log, 0, 0, &[], b"x");
        d.push(&wire);
        assert!(agent_frames(&mut d).1.is_some());
        let mut d = FrameDecoder::new();
        d.push(&[0xAB; 64]);
        assert!(agent_frames(&mut d).1.is_some());
        // A frame that would be whole only after megabytes is not waited for.
        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        protocol::encode(&mut wire, FrameType::Exit, 0, 0, &[], &vec![b'x'; 1 << 20]);
        d.push(&wire[..AGENT_PENDING_MAX + 100]);
        assert!(agent_frames(&mut d).1.is_some());
        // A frame split across reads waits for its rest.
        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        protocol::encode(&mut wire, FrameType::Exit, 0, 0, &[], b"gone");
        d.push(&wire[..5]);
        assert_eq!(agent_frames(&mut d), (vec![], None));
        d.push(&wire[5..]);
        assert_eq!(agent_frames(&mut d), (vec!["gone".into()], None));
    }
}
