'use strict';
// The Node side of perf/functions/floor-proxy.c: reads requests from fd 3 the
// way hearth's shim does (a socket with `onread` into one reused buffer) and
// answers each read with a fixed 32-byte message written straight to the
// socket. Nothing is parsed and no frame is built. With FLOOR_PIPES set (the
// proxy's pipe mode) fd 3 is a pipe it only reads, and answers go to fd 4.
//
//   node floor-instance.js     answers at once: the process hop alone
//   node floor-instance.js DIR FILE.EXPORT [METHOD PATH [BODY]]
//       first calls that handler (e.g. the Express fixture's app.handler) with
//       a function URL event of that request (default POST /greet with
//       {"name": "John Doe"}), built anew for each request as any runtime
//       must, and answers when its promise settles: 'a's when it resolved to
//       a status 200 result, else 'e's (the proxy then answers 500). The
//       result itself is dropped (the proxy answers a fixed text).
const net = require('net');
const fs = require('fs');
const path = require('path');

const ANSWER = Buffer.alloc(32, 'a');
const FAILED = Buffer.alloc(32, 'e');
const OUT = process.env.FLOOR_PIPES ? 4 : 3;
const answer = () => fs.writeSync(OUT, ANSWER);
const fail = () => fs.writeSync(OUT, FAILED);

let onRequest = answer;
if (process.argv.length > 3) {
  const [file, name] = process.argv[3].split('.');
  const handler = require(path.resolve(process.argv[2], file))[name];
  const method = process.argv[4] || 'POST';
  const rawPath = process.argv[5] || '/greet';
  const body = process.argv.length > 6 ? process.argv[6] : method === 'POST' ? '{ "name": "John Doe" }' : '';
  const headers = body === '' ? {} : { 'content-type': 'application/json', 'content-length': String(body.length) };
  let n = 0;
  const event = () => ({
    version: '2.0',
    routeKey: '$default',
    rawPath,
    rawQueryString: '',
    headers: { host: '127.0.0.1:8080', ...headers },
    requestContext: {
      accountId: 'anonymous',
      apiId: 'floor',
      domainName: '127.0.0.1:8080',
      domainPrefix: '127',
      http: { method, path: rawPath, protocol: 'HTTP/1.1', sourceIp: '127.0.0.1', userAgent: '' },
      requestId: String(++n),
      routeKey: '$default',
      stage: '$default',
      time: '01/Dec/2026:00:00:00 +0000',
      timeEpoch: Date.now(),
    },
    ...(body === '' ? {} : { body }),
    isBase64Encoded: false,
  });
  const context = { functionName: 'floor', awsRequestId: '', getRemainingTimeInMillis: () => 30000 };
  onRequest = () => {
    // A handler that throws at once fails the request the same way.
    new Promise((resolve) => resolve(handler(event(), context))).then(
      (r) => (r !== null && typeof r === 'object' && r.statusCode === 200 ? answer() : fail()),
      fail,
    );
  };
}

const chan = new net.Socket({
  fd: 3,
  readable: true,
  writable: !process.env.FLOOR_PIPES,
  onread: { buffer: Buffer.allocUnsafe(64 << 10), callback: () => { onRequest(); } },
});
chan.on('end', () => process.exit(0));
chan.on('close', () => process.exit(0));
