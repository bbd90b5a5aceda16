'use strict';
// The Node shim's own per-request work, two shim files side by side in one
// process: the INVOKE side (the metadata's JSON.parse, namedInvokeMeta,
// buildEvent, the LambdaContext) and the answer side (sendResult: the
// function URL translation and the RESPONSE frame's bytes, the write itself
// left out), on the benchmarks' requests and results. The functions are
// lifted out of each file by its section markers and run hot, in
// alternating slices; what this shows is each part's cost in a loop,
// below what an end-to-end run resolves (perf/functions/shim-ab.sh for that).
//
//   taskset -c 0 node perf/shim-parts.js A.js B.js   # e.g. the committed shim and a copy
//   APP=trivial ...                                  # the trivial handler's request and result
//
// Prints, per part, each file's median ns per call over the slices and the
// median of the slice-by-slice B/A ratios with its 10th and 90th percentile.
// Two copies of one file gave medians of pair ratios within 0.98-1.03 here.

const fs = require('fs');
const path = require('path');

const SLICES = 30; // the first WARMUP are not counted
const WARMUP = 4;
const CALLS = 50000; // per slice

/** The shim's functions under test, compiled from `file`'s source. */
function load(file) {
  const src = fs.readFileSync(file, 'utf8');
  const cut = (from, to) => {
    const a = src.indexOf(from);
    const b = src.indexOf(to, a);
    if (a < 0 || b < 0) throw new Error(`${file}: no section from ${JSON.stringify(from)} to ${JSON.stringify(to)}`);
    return src.slice(a, b);
  };
  const RULE = '// ---------------------------------------------------------------------------\n';
  const code = [
    // What the lifted code refers to outside its sections.
    'const HEADER_LEN = 16, MAGIC = 0x4854, T_RESPONSE = 18, BODY_MAX = 6 << 20, META_MAX = 1 << 20;',
    'let sunk = 0; function writeFrame(f) { sunk += f.length; return true; }',
    'function sendError() { throw new Error("an error frame in the benchmark"); }',
    'function settle() {}',
    'const fn = { id: "bench", name: "bench", arn: "", memoryStr: "128", logGroup: "", logStream: "" };',
    'function sendFrame(type, id, metaStr, body, flags = 0) { return writeFrame(frameBytes(type, id, metaStr, body, flags)); }',
    cut("/** One frame's bytes. */", RULE + '// Console output'),
    cut('function namedInvokeMeta(a) {', RULE),
    cut('// Event construction', RULE + '// Invocation.'),
    cut("// Framing is the host's job", RULE + '// Crashes.'),
    'module.exports = { sendResult, namedInvokeMeta, buildEvent, LambdaContext };',
  ].join('\n');
  const m = new module.constructor();
  m._compile(code, path.resolve(file) + '#parts');
  return m.exports;
}

const [fileA, fileB] = process.argv.slice(2);
if (!fileA || !fileB) {
  console.error('usage: node perf/shim-parts.js A.js B.js   (APP=trivial for the trivial handler)');
  process.exit(2);
}
const A = load(fileA);
const B = load(fileB);

// The requests and results of perf/functions/shim-ab.sh and the suite: the
// metadata hearth writes for wrk's request, the handler's answer.
const TAIL = '"127.0.0.1","HTTP/1.1","0c6b5a9e-3f1d-4c2a-9b7e-2d4f6a8c0e11",1764547200000,"127.0.0.1:8080",0,4102444800000]';
const express = (process.env.APP || 'express') === 'express';
const META = express
  ? '["POST","/greet","",[["host","127.0.0.1:8080"],["content-type","application/json"],["content-length","22"]],' + TAIL
  : '["GET","/","",[["host","127.0.0.1:8080"]],' + TAIL;
const BODY = express ? '{ "name": "John Doe" }' : '';
const RESULT = express
  ? {
      statusCode: 200,
      headers: {
        'x-powered-by': 'Express',
        'content-type': 'application/json; charset=utf-8',
        'content-length': '29',
        etag: 'W/"1d-aKCQWfZKrm/Z05Avp60z2Ts5+zE"',
      },
      isBase64Encoded: false,
      body: '{"message":"Hello, John Doe"}',
    }
  : { statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'ok' };

// An INVOKE frame's payload as the shim sees it: a view of its read buffer.
const readBuf = Buffer.alloc(64 << 10);
const metaLen = readBuf.write(META, 16);
const bodyLen = readBuf.write(BODY, 16 + metaLen);
// Distinct result objects, as each request's handler makes its own.
const results = Array.from({ length: 512 }, () => JSON.parse(JSON.stringify(RESULT)));

let sink = 0;
const invoke = (X) => (i) => {
  const m = X.namedInvokeMeta(JSON.parse(readBuf.toString('utf8', 16, 16 + metaLen)));
  const event = X.buildEvent(m, readBuf.subarray(16 + metaLen, 16 + metaLen + bodyLen), i);
  const ctx = new X.LambdaContext(i, event.requestContext.requestId, m.deadline_ms);
  sink += event.rawPath.length + ctx.awsRequestId.length;
};
const answer = (X) => (i) => {
  X.sendResult(i, results[i & 511]);
};
const runs = { invoke: [invoke(A), invoke(B)], answer: [answer(A), answer(B)] };
const ns = { invoke: [[], []], answer: [[], []] };
for (let s = 0; s < SLICES; s++) {
  for (const part of Object.keys(runs)) {
    for (const side of [0, 1]) {
      const f = runs[part][side];
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < CALLS; i++) f(i);
      if (s >= WARMUP) ns[part][side].push(Number(process.hrtime.bigint() - t0) / CALLS);
    }
  }
}

const sorted = (a) => [...a].sort((x, y) => x - y);
const at = (a, q) => sorted(a)[Math.min(a.length - 1, Math.floor(a.length * q))];
console.log(`# node ${process.version}, ${express ? 'Express POST /greet' : 'trivial'}, ${SLICES - WARMUP} slices of ${CALLS} calls`);
console.log(`# A: ${fileA}\n# B: ${fileB}`);
for (const part of Object.keys(ns)) {
  const [a, b] = ns[part];
  const ratios = a.map((x, i) => b[i] / x);
  console.log(
    `${part.padEnd(7)} A ${at(a, 0.5).toFixed(0)} ns  B ${at(b, 0.5).toFixed(0)} ns  ` +
      `B/A ${at(ratios, 0.5).toFixed(3)} [${at(ratios, 0.1).toFixed(3)}, ${at(ratios, 0.9).toFixed(3)}]`,
  );
}
if (sink === -1) console.log(sink); // keeps the results observable
