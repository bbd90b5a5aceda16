'use strict';
// The Express fixture's app (tests/fixtures/express-app/app.js), same routes
// for / and /greet, served bare with app.listen instead of through hearth.
// Usage: node bare-express.js <fixture-dir> [port]; prints "listening <port>".
const path = require('path');
const fixture = path.resolve(process.argv[2] || path.join(__dirname, '../../tests/fixtures/express-app'));
const express = require(path.join(fixture, 'node_modules/express'));

const app = express();

app.get('/', (req, res) => {
  res.type('text/plain').send('Hello from hearth');
});

app.post('/greet', express.json(), (req, res) => {
  const name = req.body && req.body.name;
  res.json({ message: `Hello, ${name}` });
});

const server = app.listen(Number(process.argv[3] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
