'use strict';
/*
 * hearth Node.js runtime shim.
 *
 * Started by the guest agent as `node bootstrap.js`. File descriptor 3 is a
 * bidirectional stream socket carrying hearth frames (see
 * include/hearth_protocol.h): to the host itself (process sandbox, the
 * agent's direct mode) or to the agent, which relays (microVMs). When fd 3
 * is a pipe instead (the process sandbox: a message through a pipe costs
 * less than one through a socket), it only reads, and frames go back on
 * the pipe that is fd 4. Writes to
 * process.stdout / process.stderr become LOG frames on that socket, tagged
 * with the running invocation and ordered before its answer; raw writes to
 * fds 1 and 2 (native code, child processes) go to pipes the agent turns
 * into LOG frames. Diagnostics about the socket itself go to the raw stderr.
 *
 * Lifecycle
 *   - boot and wait: a runtime may be started before it knows its function.
 *   - HELLO (first): set the Lambda environment, chdir to the task root, load
 *     the handler, answer READY {init_ms, runtime} or INIT_ERROR
 *     {errorType, errorMessage, stack}. After INIT_ERROR the process stays up
 *     until the host kills it.
 *   - HELLO (later, e.g. after a snapshot restore): apply `env` again and
 *     answer READY (or the same INIT_ERROR) at once; nothing is reloaded.
 *   - INVOKE: build an API Gateway HTTP API 2.0 event (the shape Lambda
 *     function URLs deliver), call the handler, answer RESPONSE or ERROR with
 *     the same request id. One invocation runs at a time; frames that arrive
 *     meanwhile are queued (hearth sends a quick instance its next request
 *     ahead this way, with no deadline in its metadata: it is set when the
 *     request starts, from the timeout). With `raw: true` in its metadata (the service
 *     API's Invoke) the body is the event's JSON text and the answer is the
 *     result's JSON text as it is, with no function-URL translation; an ERROR
 *     then also carries the stack as `trace`, as Lambda's Node runtime reports.
 *   - A handler wrapped in `awslambda.streamifyResponse` answers with
 *     STREAM_HEAD, STREAM_CHUNKs as it writes and STREAM_END instead (see
 *     "Response streaming" below).
 *
 * Requires Node >= 18, CommonJS, no dependencies.
 */

const net = require('net');
const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');
const { performance } = require('perf_hooks');
const { Writable } = require('stream');
const crypto = require('crypto');

// ---------------------------------------------------------------------------
// Wire protocol constants (mirror include/hearth_protocol.h).

const MAGIC = 0x4854;
const HEADER_LEN = 16;
const META_MAX = 1 << 20;
const BODY_MAX = 8 << 20;

const T_HELLO = 1;
const T_INVOKE = 2;
const T_READY = 16;
const T_INIT_ERROR = 17;
const T_RESPONSE = 18;
const T_ERROR = 19;
const T_LOG = 20;
const T_STREAM_HEAD = 21;
const T_STREAM_CHUNK = 22;
const T_STREAM_END = 23;
// The agent's own report when hearth serves the Runtime API; the shim never sees it.
const T_EXIT = 24;
const LOG_STDERR = 1;
// A streamed answer is cut into chunks of at most STREAM_CHUNK_MAX bytes and
// may hold STREAM_MAX bytes in all.
const STREAM_CHUNK_MAX = 64 << 10;
const STREAM_MAX = 20 << 20;
// LOG frame bodies are cut at this size; output beyond LOG_BACKLOG_MAX bytes
// waiting in the socket's user-space buffer is dropped (and counted), since a
// socket write never blocks the way a pipe write does.
const LOG_CHUNK = 64 << 10;
const LOG_BACKLOG_MAX = 4 << 20;

// Region used for AWS_REGION / the ARN when the function's env sets none.
const DEFAULT_REGION = 'us-east-1';
const ACCOUNT_ID = '000000000000';

// ---------------------------------------------------------------------------
// Channel.

// The real stderr (a pipe to the agent), for trouble with the socket itself.
const rawStderr = process.stderr.write.bind(process.stderr);

// Reads land in this one buffer (`onread`: no stream 'data' events, no new
// buffer per read; measured 10.0-11.4 -> 8.9-9.2 us of CPU per trivial round
// trip in perf/shim-bench.js). What a read holds is valid only until the next
// read: the frame reader below copies whatever it keeps longer.
const READ_BUF_LEN = 64 << 10;
// Where frames are written: fd 3 itself, or fd 4 when fd 3 is a pipe.
let OUT_FD = 3;
let chan; // reads frames (and writes them when it is a socket)
let chanOut; // writes frames: `chan`, or the pipe that is fd 4
try {
  if (fs.fstatSync(3).isFIFO()) OUT_FD = 4;
  chan = new net.Socket({
    fd: 3,
    readable: true,
    writable: OUT_FD === 3,
    onread: {
      buffer: Buffer.allocUnsafe(READ_BUF_LEN),
      // Returns nothing: a callback returning false would stop the reads.
      callback: (n, buf) => {
        onChunk(buf.subarray(0, n));
      },
    },
  });
  chanOut = chan;
  if (OUT_FD !== 3) {
    chanOut = new net.Socket({ fd: OUT_FD, readable: false, writable: true });
    // Only reading keeps the process waiting; queued writes hold it anyway.
    chanOut.unref();
  }
} catch (e) {
  rawStderr(`hearth runtime: fd 3 is not a usable channel (${e && e.message})\n`);
  process.exit(70);
}

function die(code) {
  // Let an answer already handed to the channel reach the host, then leave.
  chan.removeAllListeners('end');
  chan.removeAllListeners('close');
  chanOut.removeAllListeners('close');
  if (chanOut.writableLength === 0) process.exit(code);
  chanOut.once('drain', () => process.exit(code));
  chanOut.once('close', () => process.exit(code));
  setTimeout(() => process.exit(code), 1000).unref();
}

for (const c of new Set([chan, chanOut])) {
  c.on('error', (e) => {
    rawStderr(`hearth runtime: channel error: ${e && e.message}\n`);
    process.exit(71);
  });
}
// The agent went away: nobody can reach this instance any more.
chan.on('end', () => process.exit(0));
chan.on('close', () => process.exit(0));
if (chanOut !== chan) chanOut.on('close', () => process.exit(0));

/**
 * Sends one frame. `body` is a Buffer/Uint8Array, a string (written as UTF-8
 * straight into the frame) or null. Returns false when the frame had to wait
 * behind others (the channel's 'drain' tells when they are out).
 */
function sendFrame(type, id, metaStr, body, flags = 0) {
  return writeFrame(frameBytes(type, id, metaStr, body, flags));
}

/**
 * Writes a frame straight to the socket when nothing else waits to be
 * written, else (or for what the socket would not take at once) queues it
 * behind the rest on the stream. The direct write skips the stream's
 * per-write request object and callbacks (~3 us of an Express round trip
 * in perf/shim-bench.js), and lets output printed just before
 * process.exit() reach the host, as it would through a pipe.
 */
function writeFrame(frame) {
  if (chanOut.destroyed) return false;
  let off = 0;
  if (chanOut.writableLength === 0) {
    try {
      while (off < frame.length) off += fs.writeSync(OUT_FD, frame, off);
      return true;
    } catch (e) {
      if (e.code !== 'EAGAIN') {
        chanOut.destroy(e); // the channel is broken: its 'error' handler ends the runtime
        return false;
      }
    }
  }
  return chanOut.write(off === 0 ? frame : frame.subarray(off));
}

/** One frame's bytes. */
function frameBytes(type, id, metaStr, body, flags) {
  const metaLen = metaStr ? Buffer.byteLength(metaStr, 'utf8') : 0;
  let bodyLen = 0;
  if (body != null) bodyLen = typeof body === 'string' ? Buffer.byteLength(body, 'utf8') : body.length;
  return frameOf(type, flags, id, metaStr, metaLen, body, bodyLen);
}

/**
 * A frame's bytes from its parts and their UTF-8 lengths, measured once by
 * the caller. The header is stored byte by byte and strings go through
 * Buffer's own UTF-8 writer: `writeUInt32LE` and `write(s, off, len,
 * 'utf8')` check and sort out their arguments on every call, which made up
 * half of the ~0.5 us a RESPONSE frame took (perf/RESULTS.md, issue 14).
 */
function frameOf(type, flags, id, metaStr, metaLen, body, bodyLen) {
  const buf = Buffer.allocUnsafe(HEADER_LEN + metaLen + bodyLen);
  buf[0] = MAGIC & 0xff;
  buf[1] = MAGIC >>> 8;
  buf[2] = type;
  buf[3] = flags;
  putU32(buf, 4, id);
  putU32(buf, 8, metaLen);
  putU32(buf, 12, bodyLen);
  if (metaLen !== 0) putUtf8(buf, metaStr, HEADER_LEN, metaLen);
  if (bodyLen !== 0) {
    const off = HEADER_LEN + metaLen;
    if (typeof body === 'string') putUtf8(buf, body, off, bodyLen);
    else buf.set(body, off);
  }
  return buf;
}

function putU32(buf, off, v) {
  buf[off] = v;
  buf[off + 1] = v >>> 8;
  buf[off + 2] = v >>> 16;
  buf[off + 3] = v >>> 24;
}

/** Bytes as text: Buffer's own UTF-8 reader, without `toString`'s argument checks. */
const utf8Text =
  typeof Buffer.prototype.utf8Slice === 'function'
    ? (buf, start = 0, end = buf.length) => buf.utf8Slice(start, end)
    : (buf, start = 0, end = buf.length) => buf.toString('utf8', start, end);

const putUtf8 =
  typeof Buffer.prototype.utf8Write === 'function'
    ? (buf, s, off, len) => buf.utf8Write(s, off, len)
    : (buf, s, off, len) => buf.write(s, off, len, 'utf8');

// ---------------------------------------------------------------------------
// Console output as LOG frames (see the top of the file).

let current = null; // LambdaContext of the running invocation
let logDropped = 0; // bytes dropped while the socket's backlog was full

function sendLog(flags, body) {
  const id = current !== null ? current._frameId() : 0;
  if (typeof body === 'string') {
    if (body.length <= LOG_CHUNK / 4) {
      writeLog(frameBytes(T_LOG, id, null, body, flags), Buffer.byteLength(body));
      return;
    }
    body = Buffer.from(body, 'utf8');
  }
  for (let off = 0; off < body.length; ) {
    let end = Math.min(off + LOG_CHUNK, body.length);
    // Cut between UTF-8 characters (continuation bytes are 10xxxxxx).
    while (end < body.length && end > off + 1 && (body[end] & 0xc0) === 0x80) end--;
    const piece = body.subarray(off, end);
    writeLog(frameBytes(T_LOG, id, null, piece, flags), piece.length);
    off = end;
  }
}

/**
 * Writes a LOG frame (`writeFrame`); dropped (and counted) while more than
 * LOG_BACKLOG_MAX bytes wait, unless `force` (the runtime's own last words).
 */
function writeLog(frame, textBytes, force = false) {
  if (chanOut.destroyed) return;
  if (!force && chanOut.writableLength > LOG_BACKLOG_MAX) {
    logDropped += textBytes;
    return;
  }
  if (logDropped !== 0) {
    const note = `[hearth: ${logDropped} bytes of output dropped]\n`;
    logDropped = 0;
    writeLog(frameBytes(T_LOG, frame.readUInt32LE(4), null, note, LOG_STDERR), 0, force);
  }
  writeFrame(frame);
}

/** A replacement for `stream.write` that sends LOG frames. */
function logWriter(flags) {
  return function write(chunk, encoding, cb) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    let body;
    if (typeof chunk === 'string') {
      body = encoding && encoding !== 'utf8' && encoding !== 'utf-8' ? Buffer.from(chunk, encoding) : chunk;
    } else if (chunk instanceof Uint8Array) {
      body = chunk;
    } else {
      body = String(chunk);
    }
    if (body.length !== 0) sendLog(flags, body);
    if (typeof cb === 'function') process.nextTick(cb);
    return true;
  };
}

process.stdout.write = logWriter(0);
process.stderr.write = logWriter(LOG_STDERR);

// ---------------------------------------------------------------------------
// Incremental frame reader. Each byte is copied at most once: a frame that
// lies inside one read is used as a view of the read buffer, valid only while
// it is dispatched (an invocation that must wait copies its body, see
// onInvoke); a frame split over reads is assembled into a buffer of exactly
// its size.

const hdrBuf = Buffer.alloc(HEADER_LEN);
let hdrFill = 0; // bytes of a split header collected in hdrBuf
let fType = 0;
let fId = 0;
let fMetaLen = 0;
let fBodyLen = 0;
let fBuf = null; // assembling frame payload (meta + body), or null
let fFill = 0;

function protocolError(msg) {
  rawStderr(`hearth runtime: protocol error: ${msg}; closing\n`);
  chan.destroy();
  process.exit(72);
}

function parseHeader(b, o) {
  if (b.readUInt16LE(o) !== MAGIC) protocolError('bad magic');
  fType = b[o + 2];
  fId = b.readUInt32LE(o + 4);
  fMetaLen = b.readUInt32LE(o + 8);
  fBodyLen = b.readUInt32LE(o + 12);
  if (fMetaLen > META_MAX || fBodyLen > BODY_MAX) protocolError('frame over size limits');
  if (!((fType >= 1 && fType <= 2) || (fType >= 16 && fType <= 23))) {
    protocolError(`unknown frame type ${fType}`);
  }
}

/** Takes one read's bytes (a view of the read buffer). */
function onChunk(chunk) {
  let pos = 0;
  const len = chunk.length;
  while (pos < len) {
    if (fBuf !== null) {
      // Continue a frame split across chunks.
      const n = Math.min(fBuf.length - fFill, len - pos);
      chunk.copy(fBuf, fFill, pos, pos + n);
      fFill += n;
      pos += n;
      if (fFill === fBuf.length) {
        const b = fBuf;
        fBuf = null;
        dispatch(fType, fId, b, 0, fMetaLen, fBodyLen);
      }
      continue;
    }
    // Header.
    if (hdrFill === 0 && len - pos >= HEADER_LEN) {
      parseHeader(chunk, pos);
      pos += HEADER_LEN;
    } else {
      const n = Math.min(HEADER_LEN - hdrFill, len - pos);
      chunk.copy(hdrBuf, hdrFill, pos, pos + n);
      hdrFill += n;
      pos += n;
      if (hdrFill < HEADER_LEN) break;
      hdrFill = 0;
      parseHeader(hdrBuf, 0);
    }
    const need = fMetaLen + fBodyLen;
    if (len - pos >= need) {
      const start = pos;
      pos += need;
      dispatch(fType, fId, chunk, start, fMetaLen, fBodyLen);
    } else {
      fBuf = Buffer.allocUnsafe(need);
      fFill = len - pos;
      chunk.copy(fBuf, 0, pos, len);
      pos = len;
    }
  }
}

function dispatch(type, id, buf, off, metaLen, bodyLen) {
  let meta = null;
  let badMeta = null;
  if (metaLen !== 0) {
    try {
      meta = JSON.parse(utf8Text(buf, off, off + metaLen));
    } catch (e) {
      badMeta = e;
    }
  }
  if (meta === null || typeof meta !== 'object') meta = EMPTY_META;
  if (type === T_INVOKE) {
    if (Array.isArray(meta)) meta = namedInvokeMeta(meta);
    const body = buf.subarray(off + metaLen, off + metaLen + bodyLen);
    if (badMeta !== null) {
      sendError(id, 'Runtime.InvalidFrame', `invoke metadata is not valid JSON: ${badMeta.message}`);
      return;
    }
    onInvoke(id, meta, body);
  } else if (type === T_HELLO) {
    if (badMeta !== null) {
      process.stderr.write(`hearth runtime: HELLO metadata is not valid JSON: ${badMeta.message}\n`);
    }
    onHello(meta);
  }
  // Other known types are guest->host frames or logs: nothing to do here.
}

const EMPTY_META = Object.freeze({});

/**
 * The INVOKE metadata as hearth sends it, a JSON array in a fixed order (an
 * array parses in ~40 % less time than an object with these keys), as the object
 * with named fields the rest of the shim reads. The named form is accepted too.
 */
function namedInvokeMeta(a) {
  return {
    method: a[0],
    path: a[1],
    query: a[2],
    headers: a[3],
    source_ip: a[4],
    protocol: a[5],
    request_id: a[6],
    time_ms: a[7],
    domain: a[8],
    raw: a[9] === 1 || a[9] === true,
    deadline_ms: a[10],
  };
}

// ---------------------------------------------------------------------------
// Function configuration (filled in by the first HELLO).

const S_WAITING = 0; // no HELLO yet
const S_LOADING = 1; // loading the handler
const S_READY = 2;
const S_FAILED = 3; // INIT_ERROR sent; waiting to be killed

let state = S_WAITING;
let handlerFn = null;
let handlerWantsCallback = false;
let initMs = 0;
let initErrorMeta = null; // JSON string of the INIT_ERROR meta

const fn = {
  id: '',
  name: '',
  memoryStr: '128',
  timeoutMs: 30000,
  arn: '',
  logGroup: '',
  logStream: '',
};

function newLogStreamName() {
  const d = new Date();
  const y = d.getUTCFullYear();
  const m = String(d.getUTCMonth() + 1).padStart(2, '0');
  const day = String(d.getUTCDate()).padStart(2, '0');
  return `${y}/${m}/${day}/[$LATEST]${crypto.randomBytes(16).toString('hex')}`;
}

function applyUserEnv(env) {
  if (env === null || typeof env !== 'object') return;
  for (const k of Object.keys(env)) {
    const v = env[k];
    if (v === null || v === undefined) delete process.env[k];
    else process.env[k] = String(v);
  }
}

/**
 * Environment of the first HELLO, in three layers:
 *   1. the function's own `env`;
 *   2. defaults where neither the function nor the agent set a value:
 *      AWS_REGION / AWS_DEFAULT_REGION (us-east-1, mirrored into each
 *      other), TZ=:UTC as on Lambda (replacing an inherited TZ unless the
 *      function sets one);
 *   3. identity variables the function cannot override (name, version,
 *      memory, handler, task root, log group/stream, execution env).
 */
function setupEnvironment(hello) {
  const env = process.env;
  const userEnv = hello.env && typeof hello.env === 'object' ? hello.env : {};
  applyUserEnv(userEnv);
  if (!env.AWS_REGION) env.AWS_REGION = env.AWS_DEFAULT_REGION || DEFAULT_REGION;
  if (!env.AWS_DEFAULT_REGION) env.AWS_DEFAULT_REGION = env.AWS_REGION;
  if (!('TZ' in userEnv)) env.TZ = ':UTC';

  fn.id = String(hello.function || '');
  fn.name = fn.id;
  const mem = Number(hello.memory_mb);
  fn.memoryStr = String(Number.isFinite(mem) && mem > 0 ? Math.floor(mem) : 128);
  const tmo = Number(hello.timeout_ms);
  fn.timeoutMs = Number.isFinite(tmo) && tmo > 0 ? tmo : 30000;
  const region = env.AWS_REGION || DEFAULT_REGION;
  fn.arn = `arn:aws:lambda:${region}:${ACCOUNT_ID}:function:${fn.name}`;
  fn.logGroup = `/aws/lambda/${fn.name}`;
  fn.logStream = newLogStreamName();

  const major = process.versions.node.split('.')[0];
  env.AWS_LAMBDA_FUNCTION_NAME = fn.name;
  env.AWS_LAMBDA_FUNCTION_VERSION = '$LATEST';
  env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE = fn.memoryStr;
  env.AWS_LAMBDA_LOG_GROUP_NAME = fn.logGroup;
  env.AWS_LAMBDA_LOG_STREAM_NAME = fn.logStream;
  env.AWS_LAMBDA_INITIALIZATION_TYPE = 'on-demand';
  env.AWS_EXECUTION_ENV = `AWS_Lambda_nodejs${major}.x`;
  env.LAMBDA_TASK_ROOT = String(hello.task_root || '/var/task');
  env.LAMBDA_RUNTIME_DIR = __dirname;
  env._HANDLER = String(hello.handler || '');
}

// ---------------------------------------------------------------------------
// HELLO and handler loading.

function readyMeta() {
  return JSON.stringify({ init_ms: initMs, runtime: `node ${process.version}` });
}

function onHello(hello) {
  if (state === S_WAITING) {
    state = S_LOADING;
    const t0 = performance.now();
    try {
      setupEnvironment(hello);
    } catch (e) {
      process.stderr.write(`hearth runtime: environment setup failed: ${e && e.stack}\n`);
    }
    const taskRoot = String(hello.task_root || '/var/task');
    try {
      process.chdir(taskRoot);
    } catch (e) {
      process.stderr.write(`hearth runtime: chdir ${taskRoot}: ${e && e.message}\n`);
    }
    loadHandler(taskRoot, String(hello.handler || '')).then(
      (f) => {
        if (state !== S_LOADING) return; // an async init failure already reported
        handlerFn = f;
        handlerWantsCallback = f.length >= 3;
        initMs = Math.round((performance.now() - t0) * 1000) / 1000;
        state = S_READY;
        sendFrame(T_READY, 0, readyMeta(), null);
        drainQueue();
      },
      (e) => failInit(initErrorFrom(e)),
    );
    return;
  }
  // Later HELLO: refresh env only, and (a clone restored from a snapshot)
  // stop sharing the template's random state.
  reseedClone(hello);
  applyUserEnv(hello.env);
  fn.logStream = newLogStreamName();
  process.env.AWS_LAMBDA_LOG_STREAM_NAME = fn.logStream;
  if (state === S_READY) sendFrame(T_READY, 0, readyMeta(), null);
  else if (state === S_FAILED) sendFrame(T_INIT_ERROR, 0, initErrorMeta, null);
  // S_LOADING: READY / INIT_ERROR follows when loading ends.
}

// ---------------------------------------------------------------------------
// Random state of clones. Every VM restored from one snapshot starts with the
// template's V8 Math.random state, OpenSSL DRBG state and Node's cached
// randomUUID bytes; the agent reseeds the guest kernel, but those live in
// this process. A later HELLO carries fresh host randomness (`seed0..3`):
// from it, Math.random becomes a xoshiro128** generator with a clone-unique
// seed, and the bytes of crypto.randomBytes / randomFillSync / randomUUID
// are XORed with a clone-unique AES-256-CTR key stream (the result is at
// least as random as OpenSSL's output, and differs per clone). Not reached:
// functions a module took out of `crypto` before the snapshot, randomInt,
// and webcrypto's getRandomValues (a getter Node does not let us replace).

const cryptoOrig = {
  randomBytes: crypto.randomBytes,
  randomFillSync: crypto.randomFillSync,
};
let cloneMix = null;

function reseedClone(hello) {
  const seeds = [0, 1, 2, 3].map((i) => hello[`seed${i}`]).filter((v) => typeof v === 'number');
  if (seeds.length === 0) return;
  const key = crypto.createHash('sha512')
    .update(`hearth clone ${seeds.join(',')} ${process.hrtime.bigint()}`)
    .update(cryptoOrig.randomBytes(32))
    .digest();
  cloneMix = crypto.createCipheriv('aes-256-ctr', key.subarray(0, 32), key.subarray(32, 48));
  const st = new Uint32Array(4);
  for (let i = 0; i < 4; i++) st[i] = key.readUInt32LE(48 + 4 * (i % 4)) ^ (i + 1);
  const rotl = (x, k) => (x << k) | (x >>> (32 - k));
  const next = () => {
    const r = Math.imul(rotl(Math.imul(st[1], 5), 7), 9) >>> 0;
    const t = st[1] << 9;
    st[2] ^= st[0]; st[3] ^= st[1]; st[1] ^= st[2]; st[0] ^= st[3];
    st[2] ^= t; st[3] = rotl(st[3], 11);
    return r;
  };
  Math.random = function random() {
    return ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
  };
  const mixed = (buf) => {
    const u8 = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
    cloneMix.update(u8).copy(u8);
    return buf;
  };
  crypto.randomBytes = function randomBytes(size, cb) {
    if (typeof cb !== 'function') return mixed(cryptoOrig.randomBytes(size));
    return cryptoOrig.randomBytes(size, (err, buf) => cb(err, err ? buf : mixed(buf)));
  };
  crypto.randomFillSync = function randomFillSync(buf, offset, size) {
    cryptoOrig.randomFillSync(buf, offset, size);
    const view = ArrayBuffer.isView(buf) ? buf : new Uint8Array(buf);
    const start = (offset | 0) * (view.BYTES_PER_ELEMENT || 1);
    const len = size === undefined ? view.byteLength - start : size * (view.BYTES_PER_ELEMENT || 1);
    mixed(new Uint8Array(view.buffer, view.byteOffset + start, len));
    return buf;
  };
  crypto.randomUUID = function randomUUID() {
    const b = crypto.randomBytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = b.toString('hex');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  };
}

function failInit(info) {
  if (state === S_FAILED) return;
  state = S_FAILED;
  initErrorMeta = JSON.stringify(info);
  // Sent even past the log backlog bound (with the count of what was
  // dropped): the deploy's error shows the tail of the output.
  const report = `${new Date().toISOString()}\tundefined\tERROR\tInit failed \t${initErrorMeta}\n`;
  writeLog(frameBytes(T_LOG, 0, null, report, LOG_STDERR), Buffer.byteLength(report), true);
  sendFrame(T_INIT_ERROR, 0, initErrorMeta, null);
  // Invocations that were waiting for the init cannot run.
  while (queue.length !== 0) {
    const q = queue.shift();
    sendFrame(T_ERROR, q.id, initErrorMeta, null);
  }
}

class InitError extends Error {
  constructor(type, message) {
    super(message);
    this.lambdaType = type;
  }
}

function stackLines(e) {
  if (e && typeof e.stack === 'string') return e.stack.split('\n');
  return [];
}

function initErrorFrom(e) {
  if (e instanceof InitError) {
    return { errorType: e.lambdaType, errorMessage: e.message, stack: [] };
  }
  if (e instanceof SyntaxError) {
    return {
      errorType: 'Runtime.UserCodeSyntaxError',
      errorMessage: `SyntaxError: ${e.message}`,
      stack: stackLines(e),
    };
  }
  if (e && (e.code === 'MODULE_NOT_FOUND' || e.code === 'ERR_MODULE_NOT_FOUND')) {
    return {
      errorType: 'Runtime.ImportModuleError',
      errorMessage: `Error: ${e.message}`,
      stack: stackLines(e),
    };
  }
  const m = errorInfo(e);
  m.stack = stackLines(e);
  return m;
}

function statKind(p) {
  try {
    const st = fs.statSync(p);
    return st.isFile() ? 1 : st.isDirectory() ? 2 : 0;
  } catch (_) {
    return 0;
  }
}

/** Resolves a handler module path (absolute, no extension) to a file. */
function resolveModuleFile(base) {
  if (statKind(base) === 1) return base;
  for (const ext of ['.js', '.mjs', '.cjs']) {
    if (statKind(base + ext) === 1) return base + ext;
  }
  if (statKind(base) === 2) {
    try {
      return require.resolve(base);
    } catch (_) {
      /* not a loadable directory */
    }
  }
  return null;
}

/** `type` of the nearest package.json above `dir` ('commonjs' if none). */
function packageType(dir) {
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (statKind(pj) === 1) {
      try {
        const t = JSON.parse(fs.readFileSync(pj, 'utf8')).type;
        return t === 'module' ? 'module' : 'commonjs';
      } catch (_) {
        return 'commonjs';
      }
    }
    const up = path.dirname(dir);
    if (up === dir) return 'commonjs';
    dir = up;
  }
}

async function loadModule(file) {
  const esm =
    file.endsWith('.mjs') || (file.endsWith('.js') && packageType(path.dirname(file)) === 'module');
  if (esm) return import(pathToFileURL(file).href);
  try {
    return require(file);
  } catch (e) {
    if (e && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
      return import(pathToFileURL(file).href);
    }
    throw e;
  }
}

/**
 * Handler string "dir/file.export[.nested]": the module is everything up to
 * the first '.' after the last '/', as on Lambda; the rest is a property path
 * into its exports. When no module exists at that split, later dots are tried
 * too, so dotted file names ("app.v2.handler" -> app.v2.js) also work.
 */
async function loadHandler(taskRoot, handlerStr) {
  const slash = handlerStr.lastIndexOf('/');
  const dir = handlerStr.slice(0, slash + 1);
  const baseName = handlerStr.slice(slash + 1);
  const firstDot = baseName.indexOf('.');
  if (firstDot <= 0 || firstDot === baseName.length - 1) {
    throw new InitError('Runtime.MalformedHandlerName', `Bad handler ${handlerStr}`);
  }
  let file = null;
  let exportPath = null;
  for (let dot = firstDot; dot !== -1; dot = baseName.indexOf('.', dot + 1)) {
    const rest = baseName.slice(dot + 1);
    if (rest === '') break;
    const f = resolveModuleFile(path.resolve(taskRoot, dir + baseName.slice(0, dot)));
    if (f !== null) {
      file = f;
      exportPath = rest;
      break;
    }
  }
  if (file === null) {
    throw new InitError(
      'Runtime.ImportModuleError',
      `Error: Cannot find module '${dir + baseName.slice(0, firstDot)}'`,
    );
  }
  const mod = await loadModule(file);
  let h = walk(mod, exportPath);
  if (h === undefined && mod && mod.default && typeof mod.default === 'object') {
    h = walk(mod.default, exportPath); // CommonJS module reached through import()
  }
  if (h === undefined || h === null) {
    throw new InitError('Runtime.HandlerNotFound', `${handlerStr} is undefined or not exported`);
  }
  if (typeof h !== 'function') {
    throw new InitError('Runtime.HandlerNotFound', `${handlerStr} is not a function`);
  }
  return h;
}

function walk(obj, dotted) {
  const parts = dotted.split('.');
  for (let i = 0; i < parts.length; i++) {
    if (obj === null || obj === undefined) return undefined;
    obj = obj[parts[i]];
  }
  return obj;
}

// ---------------------------------------------------------------------------
// Event construction (API Gateway HTTP API payload 2.0, function URL flavour).

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
let clfSecond = -1;
let clfString = '';

/** "27/Nov/2026:01:38:38 +0000", cached per second. */
function clfTime(ms) {
  const sec = Math.floor(ms / 1000);
  if (sec !== clfSecond) {
    const d = new Date(sec * 1000);
    const p2 = (n) => (n < 10 ? '0' + n : '' + n);
    clfString =
      `${p2(d.getUTCDate())}/${MONTHS[d.getUTCMonth()]}/${d.getUTCFullYear()}:` +
      `${p2(d.getUTCHours())}:${p2(d.getUTCMinutes())}:${p2(d.getUTCSeconds())} +0000`;
    clfSecond = sec;
  }
  return clfString;
}

function decodeComponent(s) {
  if (s.indexOf('%') === -1) {
    return s.indexOf('+') === -1 ? s : s.replace(/\+/g, ' ');
  }
  const t = s.indexOf('+') === -1 ? s : s.replace(/\+/g, ' ');
  try {
    return decodeURIComponent(t);
  } catch (_) {
    return t; // malformed escape: keep the text as sent
  }
}

/** Decoded parameters, repeated keys joined with ','; undefined when empty. */
function parseQuery(q) {
  let out;
  let start = 0;
  const n = q.length;
  while (start <= n) {
    let end = q.indexOf('&', start);
    if (end === -1) end = n;
    if (end > start) {
      const eq = q.indexOf('=', start);
      let k;
      let v;
      if (eq === -1 || eq > end) {
        k = decodeComponent(q.slice(start, end));
        v = '';
      } else {
        k = decodeComponent(q.slice(start, eq));
        v = decodeComponent(q.slice(eq + 1, end));
      }
      if (k !== '__proto__') {
        if (out === undefined) out = {};
        const prev = out[k];
        out[k] = typeof prev === 'string' ? prev + ',' + v : v;
      }
    }
    start = end + 1;
  }
  return out;
}

/** Whether a request body of this content type is delivered as text. */
function isTextType(ct) {
  if (ct === undefined) return false;
  if (ct === 'application/json') return true; // the common case, without the copies below
  let semi = ct.indexOf(';');
  let t = (semi === -1 ? ct : ct.slice(0, semi)).trim().toLowerCase();
  if (t.startsWith('text/')) return true;
  switch (t) {
    case 'application/json':
    case 'application/xml':
    case 'application/javascript':
    case 'application/x-www-form-urlencoded':
      return true;
    default:
      return t.endsWith('+json') || t.endsWith('+xml');
  }
}

let isUtf8;
try {
  isUtf8 = require('buffer').isUtf8;
} catch (_) {
  /* older node */
}
if (typeof isUtf8 !== 'function') {
  const strict = new TextDecoder('utf-8', { fatal: true });
  isUtf8 = (b) => {
    try {
      strict.decode(b);
      return true;
    } catch (_) {
      return false;
    }
  };
}

function buildEvent(m, body, frameId) {
  const list = m.headers;
  const headers = {};
  let cookies;
  if (Array.isArray(list)) {
    for (let i = 0; i < list.length; i++) {
      const pair = list[i];
      if (!Array.isArray(pair) || pair.length < 2) continue;
      const k = String(pair[0]).toLowerCase();
      const v = String(pair[1]);
      if (k === 'cookie') {
        const parts = v.split(';');
        for (let j = 0; j < parts.length; j++) {
          const c = parts[j].trim();
          if (c !== '') (cookies || (cookies = [])).push(c);
        }
      } else if (k !== '__proto__') {
        const prev = headers[k];
        headers[k] = typeof prev === 'string' ? prev + ',' + v : v;
      }
    }
  }

  const rawPath = typeof m.path === 'string' && m.path !== '' ? m.path : '/';
  const rawQuery = typeof m.query === 'string' ? m.query : '';
  const timeEpoch = typeof m.time_ms === 'number' ? m.time_ms : Date.now();
  let domain = typeof m.domain === 'string' && m.domain !== '' ? m.domain : headers.host;
  if (!domain) domain = 'localhost';

  const event = {
    version: '2.0',
    routeKey: '$default',
    rawPath,
    rawQueryString: rawQuery,
  };
  if (cookies !== undefined) event.cookies = cookies;
  event.headers = headers;
  if (rawQuery !== '') {
    const qs = parseQuery(rawQuery);
    if (qs !== undefined) event.queryStringParameters = qs;
  }
  event.requestContext = {
    accountId: 'anonymous',
    apiId: fn.id,
    domainName: domain,
    domainPrefix: domainPrefix(domain),
    http: {
      method: typeof m.method === 'string' ? m.method : 'GET',
      path: rawPath,
      protocol: typeof m.protocol === 'string' ? m.protocol : 'HTTP/1.1',
      sourceIp: typeof m.source_ip === 'string' ? m.source_ip : '',
      userAgent: headers['user-agent'] || '',
    },
    requestId: m.request_id != null ? String(m.request_id) : String(frameId),
    routeKey: '$default',
    stage: '$default',
    time: clfTime(timeEpoch),
    timeEpoch,
  };
  if (body.length !== 0) {
    const text = isTextType(headers['content-type']) ? utf8Text(body) : null;
    // Decoding replaces every invalid sequence with U+FFFD, so text without
    // one came from valid UTF-8 (and V8 answers at once for a one-byte
    // string); only text holding one needs the check, ~0.3 us a call.
    if (text !== null && (text.indexOf('\ufffd') === -1 || isUtf8(body))) {
      event.body = text;
      event.isBase64Encoded = false;
    } else {
      event.body = body.toString('base64');
      event.isBase64Encoded = true;
    }
  } else {
    event.isBase64Encoded = false;
  }
  return event;
}

let lastDomain = '';
let lastPrefix = '';
function domainPrefix(domain) {
  if (domain === lastDomain) return lastPrefix;
  let p = domain;
  const dot = p.indexOf('.');
  if (dot > 0) p = p.slice(0, dot);
  // Drop a port ("localhost:3000" -> "localhost"); keep IPv6 brackets whole.
  const colon = p.lastIndexOf(':');
  if (colon > 0 && p.indexOf(']') < colon && p[0] !== '[') p = p.slice(0, colon);
  else if (p[0] === '[' && p.indexOf(']') !== -1) p = p.slice(0, p.indexOf(']') + 1);
  lastDomain = domain;
  lastPrefix = p;
  return p;
}

// ---------------------------------------------------------------------------
// Lambda context object. It doubles as the record of one invocation: the
// private fields hold the frame id, deadline and "already answered" state.

class LambdaContext {
  #frameId;
  #deadline;
  #settled = false;
  #bound = null;
  #raw = false;
  #stream = null; // the ResponseStream of a streaming handler's invocation

  constructor(frameId, requestId, deadline, raw = false) {
    this.#raw = raw;
    this.callbackWaitsForEmptyEventLoop = true;
    this.functionName = fn.name;
    this.functionVersion = '$LATEST';
    this.invokedFunctionArn = fn.arn;
    this.memoryLimitInMB = fn.memoryStr;
    this.awsRequestId = requestId;
    this.logGroupName = fn.logGroup;
    this.logStreamName = fn.logStream;
    this.#frameId = frameId;
    this.#deadline = deadline;
  }

  // Methods are created (bound) only when a handler asks for them, so they
  // keep working when detached (`const { succeed } = context`).
  get getRemainingTimeInMillis() {
    return this.#methods().remaining;
  }
  get done() {
    return this.#methods().done;
  }
  get succeed() {
    return this.#methods().succeed;
  }
  get fail() {
    return this.#methods().fail;
  }

  #methods() {
    if (this.#bound === null) {
      const self = this;
      this.#bound = {
        remaining: () => self._remaining(),
        done: (err, result) => settle(self, err, result),
        succeed: (result) => settle(self, null, result),
        fail: (err) => settle(self, err == null ? new Error('handler failed') : err, undefined),
      };
    }
    return this.#bound;
  }

  _remaining() {
    const r = this.#deadline - Date.now();
    return r > 0 ? Math.floor(r) : 0;
  }
  /** Whether this invocation came through the service API's Invoke (no URL translation). */
  _isRaw() {
    return this.#raw;
  }

  _frameId() {
    return this.#frameId;
  }
  _stream() {
    return this.#stream;
  }
  _setStream(rs) {
    this.#stream = rs;
  }
  // Returns true once: the first caller gets to answer the invocation.
  _claim() {
    if (this.#settled) return false;
    this.#settled = true;
    return true;
  }
  _isSettled() {
    return this.#settled;
  }
}

// ---------------------------------------------------------------------------
// Invocation.

const queue = []; // {id, meta, body} waiting for init or for the running one
let drainWatch = false; // channel unref'd to notice an empty event loop

function onInvoke(id, meta, body) {
  if (state === S_FAILED) {
    sendFrame(T_ERROR, id, initErrorMeta, null);
    return;
  }
  // Behind the running invocation and any still queued (the queue drains in
  // a later turn of the loop: an INVOKE read before that must not jump it).
  if (state !== S_READY || current !== null || queue.length !== 0) {
    // The body is a view of the read buffer: what waits keeps a copy.
    queue.push({ id, meta, body: Buffer.from(body) });
    return;
  }
  runInvoke(id, meta, body);
}

function drainQueue() {
  while (current === null && state === S_READY && queue.length !== 0) {
    const q = queue.shift();
    runInvoke(q.id, q.meta, q.body);
  }
}

function runInvoke(id, meta, body) {
  const raw = meta.raw === true;
  let event;
  try {
    event = raw ? rawEvent(body) : buildEvent(meta, body, id);
  } catch (e) {
    sendError(id, 'Runtime.InvalidFrame', `cannot build event: ${e && e.message}`);
    return;
  }
  const deadline =
    typeof meta.deadline_ms === 'number' ? meta.deadline_ms : Date.now() + fn.timeoutMs;
  const requestId = raw
    ? String(meta.request_id != null ? meta.request_id : id)
    : event.requestContext.requestId;
  const ctx = new LambdaContext(id, requestId, deadline, raw);
  current = ctx;
  if (handlerFn[STREAMING] === true) {
    runStreaming(ctx, event);
    return;
  }

  let ret;
  try {
    ret = handlerWantsCallback ? handlerFn(event, ctx, makeCallback(ctx)) : handlerFn(event, ctx);
  } catch (e) {
    settle(ctx, e === undefined || e === null ? new Error(String(e)) : e, undefined);
    return;
  }
  if (ctx._isSettled()) return; // answered synchronously via callback/context

  if (ret !== null && (typeof ret === 'object' || typeof ret === 'function') && typeof ret.then === 'function') {
    ret.then(
      (v) => settle(ctx, null, v),
      (e) => settle(ctx, e === undefined || e === null ? new Error(`promise rejected with ${e}`) : e, undefined),
    );
  } else if (handlerWantsCallback || ret === undefined) {
    // Waits for callback(...) / context.done(...). If neither comes and the
    // event loop runs dry, the answer is null, as on Lambda.
    watchForEmptyLoop();
  } else {
    // A plain synchronous return value is taken as the result (Lambda would
    // ignore it and answer null; using it is friendlier and unambiguous).
    settle(ctx, null, ret);
  }
}

/** The event of a raw invocation: the JSON text of its body (empty: null). */
function rawEvent(body) {
  if (body === null || body === undefined || body.length === 0) return null;
  return JSON.parse(Buffer.from(body.buffer, body.byteOffset, body.length).toString('utf8'));
}

function makeCallback(ctx) {
  return function callback(err, result) {
    settle(ctx, err, result);
  };
}

function watchForEmptyLoop() {
  drainWatch = true;
  chan.unref();
}

process.on('beforeExit', () => {
  if (current !== null && !current._isSettled()) {
    if (current._stream() !== null) current._stream().end();
    else settle(current, null, null);
  }
  if (drainWatch) {
    drainWatch = false;
    chan.ref();
  }
});

/** First answer for an invocation wins; later ones are ignored. */
function settle(ctx, err, result) {
  if (!ctx._claim()) return;
  const id = ctx._frameId();
  if (err !== null && err !== undefined) {
    const info = errorInfo(err);
    logInvokeError(ctx.awsRequestId, info, err);
    if (ctx._isRaw()) info.trace = stackLines(err);
    sendFrame(T_ERROR, id, JSON.stringify(info), null);
  } else {
    try {
      if (ctx._isRaw()) {
        let json = JSON.stringify(result);
        if (json === undefined) json = 'null';
        checkAndSend(id, JSON_200_META, json);
      } else {
        sendResult(id, result);
      }
    } catch (e) {
      const info = {
        errorType: 'Runtime.MalformedResponse',
        errorMessage: `cannot translate the handler result: ${e && e.message}`,
      };
      logInvokeError(ctx.awsRequestId, info, e);
      sendFrame(T_ERROR, id, JSON.stringify(info), null);
    }
  }
  afterInvoke(ctx);
}

/** The invocation of `ctx` is answered: the next queued one may run. */
function afterInvoke(ctx) {
  if (current === ctx) current = null;
  if (drainWatch) {
    drainWatch = false;
    chan.ref();
  }
  if (queue.length !== 0) setImmediate(drainQueue);
}

function sendError(id, type, message) {
  sendFrame(T_ERROR, id, JSON.stringify({ errorType: type, errorMessage: message }), null);
}

function errorInfo(err) {
  if (err instanceof Error || (err !== null && typeof err === 'object' && typeof err.message === 'string')) {
    return {
      errorType: typeof err.name === 'string' && err.name !== '' ? err.name : 'Error',
      errorMessage: String(err.message),
    };
  }
  let msg;
  try {
    msg = typeof err === 'string' ? err : String(err);
  } catch (_) {
    msg = Object.prototype.toString.call(err);
  }
  return { errorType: typeof err, errorMessage: msg };
}

function logInvokeError(requestId, info, err) {
  const line = JSON.stringify({
    errorType: info.errorType,
    errorMessage: info.errorMessage,
    stack: stackLines(err),
  });
  process.stderr.write(`${new Date().toISOString()}\t${requestId}\tERROR\tInvoke Error \t${line}\n`);
}

// ---------------------------------------------------------------------------
// Response streaming, as Lambda's Node.js runtime offers it on the global
// `awslambda`: `awslambda.streamifyResponse(handler)` marks a handler
// `(event, responseStream, context)`; `awslambda.HttpResponseStream.from(
// responseStream, {statusCode, headers, cookies})` sets the HTTP status and
// headers a function URL client gets. The answer goes out as STREAM_HEAD
// (sent before the first byte or at the end), STREAM_CHUNKs as the handler
// writes, and STREAM_END. A write completes only once the channel has taken
// its bytes ('drain'), and the host stops reading the channel while its
// client is slow, so a slow client slows the handler down instead of
// filling memory.

const STREAMING = Symbol.for('hearth.streamingHandler');

function streamifyResponse(handler, _options) {
  if (typeof handler !== 'function') {
    throw new TypeError('awslambda.streamifyResponse expects a handler function');
  }
  handler[STREAMING] = true;
  return handler;
}

class ResponseStream extends Writable {
  #ctx;
  #status = 200;
  #headers = null; // [[name, value], ...] from HttpResponseStream.from
  #contentType = 'application/octet-stream';
  #headSent = false;
  #bytes = 0;

  constructor(ctx) {
    super({ highWaterMark: STREAM_CHUNK_MAX });
    this.#ctx = ctx;
    // Failures end the invocation (see _destroy); without a listener of its
    // own, a stream's 'error' would also crash the runtime.
    this.on('error', () => {});
  }

  /** Sets the content type of the answer, before its first byte. */
  setContentType(type) {
    if (!this.#headSent) this.#contentType = String(type);
  }

  _setPrelude(prelude) {
    if (this.#headSent) throw new Error('HttpResponseStream.from after the first write');
    const p = prelude !== null && typeof prelude === 'object' ? prelude : {};
    if (p.statusCode !== undefined) {
      const status = Number(p.statusCode);
      if (!Number.isInteger(status) || status < 100 || status > 999) {
        throw new TypeError(`invalid statusCode ${JSON.stringify(p.statusCode)}`);
      }
      this.#status = status;
    }
    const out = [];
    const h = p.headers;
    if (h !== null && typeof h === 'object') {
      for (const k of Object.keys(h)) pushHeader(out, k, h[k]);
    }
    if (Array.isArray(p.cookies)) {
      for (const c of p.cookies) if (c !== null && c !== undefined) out.push(['set-cookie', String(c)]);
    }
    this.#headers = out;
  }

  _headSent() {
    return this.#headSent;
  }

  #sendHead() {
    if (this.#headSent) return;
    this.#headSent = true;
    const headers = this.#headers === null ? [] : this.#headers;
    if (!headers.some((kv) => kv[0] === 'content-type')) {
      headers.unshift(['content-type', this.#contentType]);
    }
    const meta = JSON.stringify({ status: this.#status, headers });
    sendFrame(T_STREAM_HEAD, this.#ctx._frameId(), meta, null);
  }

  _write(chunk, _encoding, cb) {
    this.#sendHead();
    this.#bytes += chunk.length;
    if (this.#bytes > STREAM_MAX) {
      cb(new Error(`the streamed response exceeds ${STREAM_MAX} bytes`));
      return;
    }
    const id = this.#ctx._frameId();
    let flowing = true;
    for (let off = 0; off < chunk.length; off += STREAM_CHUNK_MAX) {
      flowing = sendFrame(T_STREAM_CHUNK, id, null, chunk.subarray(off, off + STREAM_CHUNK_MAX));
    }
    if (flowing) cb();
    else chanOut.once('drain', () => cb());
  }

  _final(cb) {
    this.#sendHead();
    finishStream(this.#ctx, null, true);
    cb();
  }

  _destroy(err, cb) {
    if (!this.#ctx._isSettled()) {
      finishStream(this.#ctx, err || new Error('the response stream was destroyed'), this.#headSent);
    }
    cb(err);
  }
}

class HttpResponseStream {
  /** Gives `stream` the HTTP status, headers and cookies of a function URL answer. */
  static from(stream, prelude) {
    if (stream === null || typeof stream !== 'object' || typeof stream._setPrelude !== 'function') {
      throw new TypeError('HttpResponseStream.from expects the responseStream of a streaming handler');
    }
    stream._setPrelude(prelude);
    return stream;
  }
}

globalThis.awslambda = Object.freeze({ streamifyResponse, HttpResponseStream });

/** Runs a streaming handler: it answers through its ResponseStream. */
function runStreaming(ctx, event) {
  const rs = new ResponseStream(ctx);
  ctx._setStream(rs);
  let ret;
  try {
    ret = handlerFn(event, rs, ctx);
  } catch (e) {
    rs.destroy(e === undefined || e === null ? new Error(String(e)) : e);
    return;
  }
  if (ret !== null && (typeof ret === 'object' || typeof ret === 'function') && typeof ret.then === 'function') {
    // A handler whose promise resolves is done: what it did not end is ended.
    ret.then(
      () => {
        if (!rs.writableEnded && !rs.destroyed) rs.end();
      },
      (e) => rs.destroy(e === undefined || e === null ? new Error(`promise rejected with ${e}`) : e),
    );
  } else {
    watchForEmptyLoop();
  }
}

/** Ends a streamed answer: STREAM_END, or ERROR when it failed before its head went out. */
function finishStream(ctx, err, headSent) {
  if (!ctx._claim()) return;
  const id = ctx._frameId();
  if (err !== null && err !== undefined) {
    const info = errorInfo(err);
    logInvokeError(ctx.awsRequestId, info, err);
    if (ctx._isRaw()) info.trace = stackLines(err);
    sendFrame(headSent ? T_STREAM_END : T_ERROR, id, JSON.stringify(info), null);
  } else {
    sendFrame(T_STREAM_END, id, null, null);
  }
  afterInvoke(ctx);
}

// ---------------------------------------------------------------------------
// Result translation (function URL rules).

// Framing is the host's job: these never travel back.
const DROPPED_HEADERS = new Set(['content-length', 'transfer-encoding', 'connection', 'keep-alive']);

function pushHeader(out, name, value) {
  if (value === null || value === undefined) return;
  const n = name.toLowerCase();
  if (DROPPED_HEADERS.has(n)) return;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      if (value[i] !== null && value[i] !== undefined) out.push([n, String(value[i])]);
    }
  } else {
    out.push([n, String(value)]);
  }
}

function sendResult(id, result) {
  if (
    result !== null &&
    typeof result === 'object' &&
    result.statusCode !== undefined &&
    !Array.isArray(result)
  ) {
    const status = Number(result.statusCode);
    if (!Number.isInteger(status) || status < 100 || status > 999) {
      throw new Error(`invalid statusCode ${JSON.stringify(result.statusCode)}`);
    }
    const out = [];
    const h = result.headers;
    const mv = result.multiValueHeaders;
    let mvNames = null;
    if (mv !== null && typeof mv === 'object') {
      for (const k of Object.keys(mv)) {
        (mvNames || (mvNames = new Set())).add(k.toLowerCase());
      }
    }
    if (h !== null && typeof h === 'object') {
      for (const k in h) {
        if (!Object.prototype.hasOwnProperty.call(h, k)) continue;
        if (mvNames !== null && mvNames.has(k.toLowerCase())) continue; // multi-value wins
        pushHeader(out, k, h[k]);
      }
    }
    if (mvNames !== null) {
      for (const k of Object.keys(mv)) pushHeader(out, k, mv[k]);
    }
    const cookies = result.cookies;
    if (Array.isArray(cookies)) {
      for (let i = 0; i < cookies.length; i++) {
        if (cookies[i] !== null && cookies[i] !== undefined) out.push(['set-cookie', String(cookies[i])]);
      }
    }
    let body = result.body;
    if (body === undefined || body === null) {
      body = null;
    } else if (typeof body === 'string') {
      if (result.isBase64Encoded === true && body !== '') body = Buffer.from(body, 'base64');
    } else if (body instanceof Uint8Array) {
      // raw bytes
    } else if (typeof body === 'object') {
      body = JSON.stringify(body);
    } else {
      body = String(body);
    }
    return checkAndSend(id, responseMeta(status, out), body);
  }
  // No statusCode: 200, application/json, the JSON text of the result.
  let json = JSON.stringify(result);
  if (json === undefined) json = 'null';
  return checkAndSend(id, JSON_200_META, json);
}

/**
 * The RESPONSE metadata: the very text `JSON.stringify({ status, headers })`
 * makes, written directly, which costs ~2.5x less for a few headers (V8's
 * generic stringify walks each object and array; perf/RESULTS.md, issue 14).
 * `status` is an integer; names and values are strings.
 */
function responseMeta(status, headers) {
  let s = '{"status":' + status + ',"headers":[';
  for (let i = 0; i < headers.length; i++) {
    s += (i === 0 ? '[' : ',[') + jsonString(headers[i][0]) + ',' + jsonString(headers[i][1]) + ']';
  }
  return s + ']}';
}

// Anything JSON must escape, and DEL and above (left to JSON.stringify,
// which also escapes lone surrogates).
const JSON_SPECIAL = /["\\\u0000-\u001f\u007f-\uffff]/;
/** A string as a JSON string literal, identical to JSON.stringify's. */
function jsonString(s) {
  return JSON_SPECIAL.test(s) ? JSON.stringify(s) : '"' + s + '"';
}

const JSON_200_META = JSON.stringify({ status: 200, headers: [['content-type', 'application/json']] });

function checkAndSend(id, metaStr, body) {
  const bodyLen = body === null ? 0 : typeof body === 'string' ? Buffer.byteLength(body, 'utf8') : body.length;
  if (bodyLen > BODY_MAX) {
    sendError(id, 'Runtime.ResponseSizeTooLarge', `response body of ${bodyLen} bytes exceeds ${BODY_MAX}`);
    return false;
  }
  const metaLen = Buffer.byteLength(metaStr, 'utf8');
  if (metaLen > META_MAX) {
    sendError(id, 'Runtime.ResponseSizeTooLarge', 'response headers exceed the metadata limit');
    return false;
  }
  writeFrame(frameOf(T_RESPONSE, 0, id, metaStr, metaLen, body, bodyLen));
  return true;
}

// ---------------------------------------------------------------------------
// Crashes. An uncaught exception or unhandled rejection fails the running
// invocation and ends the process (the host replaces the instance); during
// init it becomes INIT_ERROR and the process waits to be killed.

function onFatal(err, rejection) {
  const info = rejection
    ? {
        errorType: 'Runtime.UnhandledPromiseRejection',
        errorMessage: err instanceof Error ? `${err.name}: ${err.message}` : String(err),
      }
    : errorInfo(err);
  process.stderr.write(
    `${new Date().toISOString()}\t${current ? current.awsRequestId : 'undefined'}\tERROR\t` +
      `${rejection ? 'Unhandled Promise Rejection' : 'Uncaught Exception'} \t` +
      `${JSON.stringify({ ...info, stack: stackLines(err) })}\n`,
  );
  if (state === S_LOADING || state === S_WAITING) {
    info.stack = stackLines(err);
    failInit(info);
    return;
  }
  if (state === S_FAILED) return;
  if (current !== null && current._claim()) {
    sendFrame(T_ERROR, current._frameId(), JSON.stringify(info), null);
  }
  die(rejection ? 128 : 129);
}

process.on('uncaughtException', (err) => onFatal(err, false));
process.on('unhandledRejection', (reason) => onFatal(reason, true));

