'use strict';
// Test-side speaker of the hearth frame protocol: spawns include/runtime/
// bootstrap.js with a socket on fd 3 and exchanges frames with it. Written
// independently of the shim so the tests check the wire format, not a shared
// implementation. Used by shim.test.js and perf/shim-bench.js.

const { spawn } = require('child_process');
const path = require('path');

const BOOTSTRAP = path.resolve(__dirname, '../../include/runtime/bootstrap.js');
const FIXTURES = path.resolve(__dirname, '../fixtures');

const T = {
  HELLO: 1,
  INVOKE: 2,
  READY: 16,
  INIT_ERROR: 17,
  RESPONSE: 18,
  ERROR: 19,
  LOG: 20,
  STREAM_HEAD: 21,
  STREAM_CHUNK: 22,
  STREAM_END: 23,
};

function encodeFrame(type, id, meta, body) {
  const m = meta === undefined || meta === null ? Buffer.alloc(0) : Buffer.from(JSON.stringify(meta));
  const b = body === undefined || body === null ? Buffer.alloc(0) : Buffer.from(body);
  const h = Buffer.alloc(16);
  h.writeUInt16LE(0x4854, 0);
  h[2] = type;
  h[3] = 0;
  h.writeUInt32LE(id, 4);
  h.writeUInt32LE(m.length, 8);
  h.writeUInt32LE(b.length, 12);
  return Buffer.concat([h, m, b]);
}

class ShimClient {
  constructor(opts = {}) {
    this.child = spawn(process.execPath, [...(opts.execArgv || []), opts.bootstrap || BOOTSTRAP], {
      stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
      env: opts.env || process.env,
    });
    this.sock = this.child.stdio[3];
    this.stdout = '';
    this.stderr = '';
    this.child.stdout.setEncoding('utf8');
    this.child.stderr.setEncoding('utf8');
    this.child.stdout.on('data', (d) => (this.stdout += d));
    this.child.stderr.on('data', (d) => (this.stderr += d));
    // LOG frames, in arrival order ({id, stream, text}); their text is also
    // appended to this.stdout / this.stderr, as the host's log would show it.
    this.logs = [];
    // Every frame type in arrival order, LOG included, to check ordering.
    this.order = [];
    this.frames = [];
    this.waiters = [];
    this.pending = Buffer.alloc(0);
    this.nextId = 1;
    this.exit = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => resolve({ code, signal }));
    });
    this.sock.on('data', (d) => this._onData(d));
    this.sock.on('error', () => {});
  }

  _onData(d) {
    this.pending = this.pending.length ? Buffer.concat([this.pending, d]) : d;
    for (;;) {
      if (this.pending.length < 16) return;
      const p = this.pending;
      if (p.readUInt16LE(0) !== 0x4854) throw new Error('bad magic from shim');
      const metaLen = p.readUInt32LE(8);
      const bodyLen = p.readUInt32LE(12);
      const total = 16 + metaLen + bodyLen;
      if (p.length < total) return;
      const f = {
        type: p[2],
        flags: p[3],
        id: p.readUInt32LE(4),
        metaText: p.toString('utf8', 16, 16 + metaLen),
        body: Buffer.from(p.subarray(16 + metaLen, total)),
      };
      f.meta = metaLen ? JSON.parse(f.metaText) : null;
      this.pending = p.subarray(total);
      this._deliver(f);
    }
  }

  _deliver(f) {
    this.order.push({ type: f.type, id: f.id });
    if (f.type === T.LOG) {
      const stream = f.flags & 1 ? 'stderr' : 'stdout';
      const text = f.body.toString('utf8');
      this.logs.push({ id: f.id, stream, text });
      this[stream] += text;
      return;
    }
    for (let i = 0; i < this.waiters.length; i++) {
      if (this.waiters[i].pred(f)) {
        const w = this.waiters.splice(i, 1)[0];
        clearTimeout(w.timer);
        w.resolve(f);
        return;
      }
    }
    this.frames.push(f);
  }

  /** Next frame matching pred (already received or future). */
  next(pred = () => true, timeoutMs = 10000) {
    const i = this.frames.findIndex(pred);
    if (i !== -1) return Promise.resolve(this.frames.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`no matching frame within ${timeoutMs} ms; stderr:\n${this.stderr}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  send(type, id, meta, body) {
    this.sock.write(encodeFrame(type, id, meta, body));
  }

  writeRaw(buf) {
    this.sock.write(buf);
  }

  /** HELLO for a fixture directory; resolves with the READY/INIT_ERROR frame. */
  hello(taskRoot, handler, extra = {}) {
    this.send(T.HELLO, 0, {
      time_ms: Date.now(),
      function: extra.function || '0123456789abcdef',
      handler,
      task_root: taskRoot,
      memory_mb: extra.memory_mb || 128,
      timeout_ms: extra.timeout_ms || 30000,
      env: extra.env || {},
    });
    return this.next((f) => f.type === T.READY || f.type === T.INIT_ERROR);
  }

  /**
   * Invoke meta as hearth sends it: the positional form of
   * `namedInvokeMeta(over)` (include/hearth_protocol.h).
   */
  static invokeMeta(over = {}) {
    const m = ShimClient.namedInvokeMeta(over);
    return [m.method, m.path, m.query, m.headers, m.source_ip, m.protocol, m.request_id,
      m.time_ms, m.domain, m.raw === true ? 1 : 0, m.deadline_ms];
  }

  /** Invoke meta with named fields and defaults; `over` replaces fields. */
  static namedInvokeMeta(over = {}) {
    const now = Date.now();
    return Object.assign(
      {
        method: 'GET',
        path: '/',
        query: '',
        headers: [['host', 'localhost:3000']],
        source_ip: '127.0.0.1',
        protocol: 'HTTP/1.1',
        request_id: `req-${Math.random().toString(16).slice(2)}`,
        time_ms: now,
        deadline_ms: now + 30000,
        domain: 'localhost:3000',
      },
      over,
    );
  }

  /** Sends INVOKE and resolves with the RESPONSE/ERROR of the same id. */
  invoke(over, body) {
    const id = this.nextId++;
    this.send(T.INVOKE, id, ShimClient.invokeMeta(over), body);
    return this.next((f) => f.id === id && (f.type === T.RESPONSE || f.type === T.ERROR));
  }

  close() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    return this.exit;
  }
}

module.exports = { ShimClient, encodeFrame, T, BOOTSTRAP, FIXTURES };
