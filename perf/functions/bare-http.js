'use strict';
// A bare Node HTTP server answering like perf/functions/trivial: 200, text/plain, "hello".
// Usage: node bare-http.js [port]; prints "listening <port>".
const http = require('http');

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain' });
  res.end('hello');
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
