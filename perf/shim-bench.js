'use strict';
// Micro-benchmark of the Node runtime shim (include/runtime/bootstrap.js):
// round trips per second of a trivial handler over the fd 3 socket, with the
// host side played by this script (so both ends share the machine's cores).
//
//   node perf/shim-bench.js [seconds-per-run=3] [instances=1]
//   SHIM_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof' node perf/shim-bench.js
//   SHIM_APP=express node perf/shim-bench.js   # the Express fixture, POST /greet
//   SHIM_BOOTSTRAP=/tmp/old-bootstrap.js node perf/shim-bench.js   # another shim
//   SHIM_META=object ...   # INVOKE metadata as an object (shims before the positional form)
//
// Prints round trips per second, latency, and the shim process's CPU time
// per round trip (user + system, from /proc/<pid>/stat).
//
// Runs:
//   sequential  one INVOKE in flight per instance (what hearth does: the
//               next request is dispatched when the previous answer is in)
//   one ahead   2 INVOKEs in flight per instance (the next one waits in the
//               shim's queue while the current one runs)
//   pipelined   16 INVOKEs in flight per instance (the shim's own ceiling;
//               it queues and serves them one at a time)

const fs = require('fs');
const os = require('os');
const path = require('path');
const { ShimClient, T } = require('../tests/runtime/shim-client');

const SECONDS = Number(process.argv[2] || 3);
const INSTANCES = Number(process.argv[3] || 1);
const EXEC_ARGV = (process.env.SHIM_NODE_ARGS || '').split(' ').filter(Boolean);

const EXPRESS = process.env.SHIM_APP === 'express';
const dir = EXPRESS
  ? path.resolve(__dirname, '../tests/fixtures/express-app')
  : fs.mkdtempSync(path.join(os.tmpdir(), 'hearth-bench-'));
const HANDLER = EXPRESS ? 'app.handler' : 'index.handler';
if (!EXPRESS) {
  fs.writeFileSync(
    path.join(dir, 'index.js'),
    "exports.handler = async (event) => ({ statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'ok' });\n",
  );
}
const BODY = EXPRESS ? Buffer.from('{ "name": "John Doe" }') : Buffer.alloc(0);

// A typical small request as the host would frame it (wrk's headers), in the
// INVOKE metadata's positional form (SHIM_META=object: the named form, which
// shims older than the positional form need: they would read the array as an
// empty request and still answer).
const metaOf = process.env.SHIM_META === 'object' ? ShimClient.namedInvokeMeta : ShimClient.invokeMeta;
const META = Buffer.from(
  JSON.stringify(
    metaOf({
      method: EXPRESS ? 'POST' : 'GET',
      path: EXPRESS ? '/greet' : '/hello',
      query: EXPRESS ? '' : 'a=1',
      headers: EXPRESS
        ? [
            ['host', '127.0.0.1:8080'],
            ['content-type', 'application/json'],
            ['content-length', String(BODY.length)],
          ]
        : [
            ['host', 'localhost:3000'],
            ['user-agent', 'bench/1.0'],
            ['accept', '*/*'],
          ],
      source_ip: '127.0.0.1',
      protocol: 'HTTP/1.1',
      request_id: 'bench-request-0000000000000000',
      time_ms: Date.now(),
      deadline_ms: Date.now() + 3600000,
      domain: 'localhost:3000',
    }),
  ),
);

function invokeFrame(id) {
  const b = Buffer.allocUnsafe(16 + META.length + BODY.length);
  b.writeUInt16LE(0x4854, 0);
  b[2] = T.INVOKE;
  b[3] = 0;
  b.writeUInt32LE(id, 4);
  b.writeUInt32LE(META.length, 8);
  b.writeUInt32LE(BODY.length, 12);
  META.copy(b, 16);
  BODY.copy(b, 16 + META.length);
  return b;
}

/** CPU seconds (user + system) of a process so far. */
function cpuSeconds(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ
}

/** Drives one instance with `depth` requests in flight until `until`. */
function drive(c, depth, until) {
  return new Promise((resolve) => {
    let done = 0;
    let inFlight = 0;
    let nextId = 1;
    let pending = Buffer.alloc(0);
    const lat = [];
    const sentAt = new Map();
    const send = () => {
      const id = nextId++;
      sentAt.set(id, process.hrtime.bigint());
      inFlight++;
      c.sock.write(invokeFrame(id));
    };
    c.sock.removeAllListeners('data');
    c.sock.on('data', (d) => {
      pending = pending.length ? Buffer.concat([pending, d]) : d;
      let off = 0;
      while (pending.length - off >= 16) {
        const total = 16 + pending.readUInt32LE(off + 8) + pending.readUInt32LE(off + 12);
        if (pending.length - off < total) break;
        if (pending[off + 2] !== T.RESPONSE) throw new Error(`unexpected frame ${pending[off + 2]}`);
        const id = pending.readUInt32LE(off + 4);
        lat.push(Number(process.hrtime.bigint() - sentAt.get(id)) / 1000);
        sentAt.delete(id);
        off += total;
        done++;
        inFlight--;
      }
      pending = pending.subarray(off);
      if (Date.now() < until) {
        while (inFlight < depth) send();
      } else if (inFlight === 0) {
        resolve({ done, lat });
      }
    });
    for (let i = 0; i < depth; i++) send();
  });
}

async function run(name, clients, depth) {
  // warm-up
  await Promise.all(clients.map((c) => drive(c, depth, Date.now() + 500)));
  const t0 = process.hrtime.bigint();
  const cpu0 = clients.map((c) => cpuSeconds(c.child.pid));
  const results = await Promise.all(clients.map((c) => drive(c, depth, Date.now() + SECONDS * 1000)));
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const total = results.reduce((a, r) => a + r.done, 0);
  const lat = results.flatMap((r) => r.lat).sort((a, b) => a - b);
  const pct = (p) => lat[Math.min(lat.length - 1, Math.floor(lat.length * p))].toFixed(1);
  const cpu = clients.reduce((a, c, i) => a + cpuSeconds(c.child.pid) - cpu0[i], 0);
  console.log(
    `${name.padEnd(11)} instances=${clients.length} in-flight/instance=${String(depth).padEnd(2)} ` +
      `${Math.round(total / secs).toLocaleString('en-US').padStart(9)} round trips/s   ` +
      `latency us p50=${pct(0.5)} p99=${pct(0.99)}   shim CPU ${((cpu / total) * 1e6).toFixed(1)} us/trip`,
  );
}

(async () => {
  const clients = [];
  for (let i = 0; i < INSTANCES; i++) {
    const c = new ShimClient({ execArgv: EXEC_ARGV, bootstrap: process.env.SHIM_BOOTSTRAP });
    const f = await c.hello(dir, HANDLER);
    if (f.type !== T.READY) throw new Error(`init failed: ${f.metaText}`);
    clients.push(c);
  }
  console.log(`node ${process.version}, ${os.cpus().length} CPUs, ${SECONDS}s per run`);
  await run('sequential', clients, 1);
  await run('one ahead', clients, 2);
  await run('pipelined', clients, 16);
  // EOF on the channel makes each shim exit normally (so profiles get written).
  await Promise.all(clients.map((c) => (c.sock.end(), c.exit)));
  if (!EXPRESS) fs.rmSync(dir, { recursive: true, force: true });
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
