'use strict';
// In-process cost of a function handler, no hearth, no sockets: calls the
// handler N times, one at a time, with an API Gateway HTTP API 2.0 event like
// the one hearth's shim builds, and prints microseconds of wall time per call.
// Usage: node handler-loop.js <module.js> [GET|POST] [path] [calls]
const path = require('path');
const [mod, method = 'GET', rawPath = '/', calls = '20000'] = process.argv.slice(2);
const { handler } = require(path.resolve(mod));
const post = method === 'POST';
const event = () => ({
  version: '2.0',
  routeKey: '$default',
  rawPath,
  rawQueryString: '',
  headers: post
    ? { host: 'localhost', 'content-type': 'application/json', 'content-length': '22' }
    : { host: 'localhost' },
  requestContext: {
    accountId: '000000000000', apiId: 'hearth', domainName: 'localhost', domainPrefix: 'localhost',
    http: { method, path: rawPath, protocol: 'HTTP/1.1', sourceIp: '127.0.0.1', userAgent: 'wrk' },
    requestId: 'r', routeKey: '$default', stage: '$default', time: '', timeEpoch: Date.now(),
  },
  body: post ? '{ "name": "John Doe" }' : undefined,
  isBase64Encoded: false,
});
const context = { awsRequestId: 'r', getRemainingTimeInMillis: () => 30000 };
(async () => {
  const n = Number(calls);
  for (let i = 0; i < n; i++) await handler(event(), context); // warm-up
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await handler(event(), context);
  const us = Number(process.hrtime.bigint() - t0) / 1000 / n;
  const r = await handler(event(), context);
  console.log(`${path.basename(mod)} ${method} ${rawPath}: ${us.toFixed(1)} us/call (status ${r.statusCode})`);
})();
