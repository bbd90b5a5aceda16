'use strict';
// The Node side of perf/functions/floor-proxy.c: reads requests from fd 3 the
// way hearth's shim does (a socket with `onread` into one reused buffer) and
// answers each read with a fixed 32-byte message written straight to the
// socket. Nothing is parsed and no frame is built: this is the least an
// instance process can cost per request.
//
//   node floor-instance.js                   answers at once (the trivial floor)
//   node floor-instance.js DIR FILE.EXPORT   first calls that handler (e.g. the
//       Express fixture's app.handler) with a function URL event of
//       POST /greet {"name": "John Doe"}, built anew for each request as any
//       runtime must, and answers when its promise settles; its result is
//       dropped (the floor's proxy answers a fixed text).
const net = require('net');
const fs = require('fs');
const path = require('path');

const ANSWER = Buffer.alloc(32, 'a');
const answer = () => fs.writeSync(3, ANSWER);

let onRequest = answer;
if (process.argv.length > 3) {
  const [file, name] = process.argv[3].split('.');
  const handler = require(path.resolve(process.argv[2], file))[name];
  const body = '{ "name": "John Doe" }';
  let n = 0;
  const event = () => ({
    version: '2.0',
    routeKey: '$default',
    rawPath: '/greet',
    rawQueryString: '',
    headers: {
      host: '127.0.0.1:8080',
      'content-type': 'application/json',
      'content-length': String(body.length),
    },
    requestContext: {
      accountId: 'anonymous',
      apiId: 'floor',
      domainName: '127.0.0.1:8080',
      domainPrefix: '127',
      http: { method: 'POST', path: '/greet', protocol: 'HTTP/1.1', sourceIp: '127.0.0.1', userAgent: '' },
      requestId: String(++n),
      routeKey: '$default',
      stage: '$default',
      time: '01/Dec/2026:00:00:00 +0000',
      timeEpoch: Date.now(),
    },
    body,
    isBase64Encoded: false,
  });
  const context = { functionName: 'floor', awsRequestId: '', getRemainingTimeInMillis: () => 30000 };
  onRequest = () => {
    Promise.resolve(handler(event(), context)).then(answer, answer);
  };
}

const chan = new net.Socket({
  fd: 3,
  readable: true,
  writable: true,
  onread: { buffer: Buffer.allocUnsafe(64 << 10), callback: () => { onRequest(); } },
});
chan.on('end', () => process.exit(0));
chan.on('close', () => process.exit(0));
