'use strict';
// Node's `cluster` module in front of a bare server script: one worker per
// core (or CLUSTER_WORKERS), all accepting on one port, as a user scaling a
// Node server across cores would set it up.
// Usage: node cluster.js <server.js> [args...]; the server script must listen
// on port 0 or the port given and print "listening <port>"; this prints
// "listening <port>" once every worker listens.
const cluster = require('cluster');
const os = require('os');
const path = require('path');

if (cluster.isPrimary) {
  const workers = Number(process.env.CLUSTER_WORKERS || os.availableParallelism());
  const net = require('net');
  // Pick a free port first: every worker listens on it (the primary shares it).
  const probe = net.createServer().listen(0, '127.0.0.1', () => {
    const port = probe.address().port;
    probe.close(() => {
      let ready = 0;
      for (let i = 0; i < workers; i++) {
        const w = cluster.fork({ CLUSTER_PORT: String(port) });
        w.on('message', (m) => {
          if (m === 'listening' && ++ready === workers) console.log(`listening ${port}`);
        });
      }
    });
  });
  cluster.on('exit', (w, code) => {
    console.error(`worker ${w.process.pid} exited (${code})`);
    process.exit(1);
  });
} else {
  // The server script prints "listening <port>": tell the primary instead.
  const log = console.log;
  console.log = (...a) => {
    if (typeof a[0] === 'string' && a[0].startsWith('listening ')) process.send('listening');
    else log(...a);
  };
  const args = process.argv.slice(3);
  const script = path.resolve(process.argv[2]);
  // Servers take their port as the last argument.
  process.argv = [process.argv[0], script, ...args, process.env.CLUSTER_PORT];
  require(script);
}
