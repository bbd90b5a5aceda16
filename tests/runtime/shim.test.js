'use strict';
// Tests for include/runtime/bootstrap.js, run with `node --test tests/runtime/`.
// Each test spawns the shim with a socket on fd 3 and talks hearth frames to
// it. The express-app fixture needs its node_modules (`npm ci` in
// tests/fixtures/express-app); without them those tests are skipped.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { ShimClient, T, FIXTURES, encodeFrame } = require('./shim-client');

const FID = '0123456789abcdef';
const EXPRESS_DIR = path.join(FIXTURES, 'express-app');
const HAVE_EXPRESS = fs.existsSync(path.join(EXPRESS_DIR, 'node_modules', 'express'));

const clients = new Set();
function shim(opts) {
  const c = new ShimClient(opts);
  clients.add(c);
  return c;
}
const tmpDirs = [];
test.after(async () => {
  await Promise.all([...clients].map((c) => c.close()));
  for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true });
});

async function ready(dir, handler, extra) {
  const c = shim();
  const f = await c.hello(dir, handler, extra);
  assert.equal(f.type, T.READY, `expected READY, got ${f.type} ${f.metaText}\n${c.stderr}`);
  return c;
}

function tmpFixture(files) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hearth-shim-'));
  tmpDirs.push(dir);
  for (const [name, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, name)), { recursive: true });
    fs.writeFileSync(path.join(dir, name), text);
  }
  return dir;
}

const noFrameWithin = (c, pred, ms) =>
  c.next(pred, ms).then(
    (f) => assert.fail(`unexpected frame ${f.type} ${f.metaText}`),
    () => {},
  );

// --------------------------------------------------------------------------

test('fd 3 is a bidirectional Unix stream socket and HELLO gets READY', async () => {
  const c = shim();
  if (process.platform === 'linux') {
    const link = fs.readlinkSync(`/proc/${c.child.pid}/fd/3`);
    assert.match(link, /^socket:\[\d+\]$/);
  }
  const f = await c.hello(path.join(FIXTURES, 'plain'), 'index.handler');
  assert.equal(f.type, T.READY);
  assert.equal(f.id, 0);
  assert.deepEqual(Object.keys(f.meta).sort(), ['init_ms', 'runtime']);
  assert.equal(typeof f.meta.init_ms, 'number');
  assert.ok(f.meta.init_ms >= 0);
  assert.equal(f.meta.runtime, `node ${process.version}`);
  assert.equal(c.stdout, '', 'the shim must not write to stdout');
});

test('plain: full event, context and environment', async () => {
  const root = path.join(FIXTURES, 'plain');
  const c = await ready(root, 'index.handler', {
    function: FID,
    memory_mb: 256,
    env: { GREETING: 'hello', AWS_LAMBDA_FUNCTION_NAME: 'not-allowed' },
  });
  const timeMs = Date.UTC(2026, 10, 27, 1, 38, 38, 123);
  // Far enough out that a loaded machine's delay before the handler runs
  // still leaves most of it (with 5 s, 2 s of delay failed the check below).
  const deadline = Date.now() + 30000;
  const r = await c.invoke(
    {
      method: 'POST',
      path: '/greet',
      query: 'a=1&b=2&a=3',
      headers: [
        ['host', 'localhost:3000'],
        ['user-agent', 'test-agent/1.0'],
        ['content-type', 'application/json'],
        ['cookie', 'a=1; b=2'],
        ['x-multi', 'one'],
        ['x-multi', 'two'],
        ['cookie', ' c=3 ;'],
      ],
      source_ip: '10.1.2.3',
      protocol: 'HTTP/1.1',
      request_id: 'req-123',
      time_ms: timeMs,
      deadline_ms: deadline,
      domain: 'localhost:3000',
    },
    '{"name":"hearth"}',
  );
  assert.equal(r.type, T.RESPONSE, r.metaText);
  assert.deepEqual(r.meta, {
    status: 200,
    headers: [
      ['content-type', 'application/json'],
      ['x-fixture', 'plain'],
    ],
  });
  const out = JSON.parse(r.body.toString());
  assert.deepEqual(out.event, {
    version: '2.0',
    routeKey: '$default',
    rawPath: '/greet',
    rawQueryString: 'a=1&b=2&a=3',
    cookies: ['a=1', 'b=2', 'c=3'],
    headers: {
      host: 'localhost:3000',
      'user-agent': 'test-agent/1.0',
      'content-type': 'application/json',
      'x-multi': 'one,two',
    },
    queryStringParameters: { a: '1,3', b: '2' },
    requestContext: {
      accountId: 'anonymous',
      apiId: FID,
      domainName: 'localhost:3000',
      domainPrefix: 'localhost',
      http: {
        method: 'POST',
        path: '/greet',
        protocol: 'HTTP/1.1',
        sourceIp: '10.1.2.3',
        userAgent: 'test-agent/1.0',
      },
      requestId: 'req-123',
      routeKey: '$default',
      stage: '$default',
      time: '27/Nov/2026:01:38:38 +0000',
      timeEpoch: timeMs,
    },
    body: '{"name":"hearth"}',
    isBase64Encoded: false,
  });
  // Key order as function URLs send it.
  assert.deepEqual(Object.keys(out.event), [
    'version',
    'routeKey',
    'rawPath',
    'rawQueryString',
    'cookies',
    'headers',
    'queryStringParameters',
    'requestContext',
    'body',
    'isBase64Encoded',
  ]);
  const { remainingMs, logStreamName, ...ctx } = out.context;
  assert.deepEqual(ctx, {
    functionName: FID,
    functionVersion: '$LATEST',
    invokedFunctionArn: `arn:aws:lambda:us-east-1:000000000000:function:${FID}`,
    memoryLimitInMB: '256',
    awsRequestId: 'req-123',
    logGroupName: `/aws/lambda/${FID}`,
  });
  assert.match(logStreamName, /^\d{4}\/\d{2}\/\d{2}\/\[\$LATEST\][0-9a-f]{32}$/);
  assert.ok(remainingMs > 20000 && remainingMs <= 30000, `remaining ${remainingMs}`);
  assert.deepEqual(out.env, {
    AWS_LAMBDA_FUNCTION_NAME: FID,
    AWS_LAMBDA_FUNCTION_VERSION: '$LATEST',
    AWS_LAMBDA_FUNCTION_MEMORY_SIZE: '256',
    AWS_LAMBDA_LOG_GROUP_NAME: `/aws/lambda/${FID}`,
    AWS_REGION: process.env.AWS_REGION || 'us-east-1',
    AWS_DEFAULT_REGION: process.env.AWS_DEFAULT_REGION || process.env.AWS_REGION || 'us-east-1',
    LAMBDA_TASK_ROOT: root,
    _HANDLER: 'index.handler',
    TZ: ':UTC',
    GREETING: 'hello',
  });
  assert.equal(out.cwd, root);
});

test('plain: INVOKE metadata with named fields gives the same event as the positional form', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const over = { method: 'PUT', path: '/echo', query: 'a=1', protocol: 'HTTP/1.0', domain: 'x.example:81',
    request_id: 'req-same', time_ms: 1764466718000, deadline_ms: Date.now() + 30000,
    headers: [['host', 'x.example:81'], ['content-type', 'text/plain']] };
  const events = [];
  for (const meta of [ShimClient.invokeMeta(over), ShimClient.namedInvokeMeta(over)]) {
    const id = 900 + events.length;
    c.send(T.INVOKE, id, meta, Buffer.from('hi'));
    const r = await c.next((f) => f.id === id && (f.type === T.RESPONSE || f.type === T.ERROR));
    assert.equal(r.type, T.RESPONSE, r.metaText);
    events.push(JSON.parse(r.body.toString()).event);
  }
  assert.ok(Array.isArray(ShimClient.invokeMeta(over)));
  assert.deepEqual(events[0], events[1]);
  const ctx = events[0].requestContext;
  assert.deepEqual([ctx.http.method, ctx.http.protocol, ctx.domainName, ctx.requestId, ctx.timeEpoch],
    ['PUT', 'HTTP/1.0', 'x.example:81', 'req-same', 1764466718000]);
  assert.equal(events[0].rawQueryString, 'a=1');
  assert.equal(events[0].body, 'hi');
});

test('plain: request without query, cookies or body omits those fields', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler', { function: FID });
  const r = await c.invoke({ path: '/', headers: [['host', 'example.test']], domain: 'abc.lambda-url.local' });
  const e = JSON.parse(r.body.toString()).event;
  assert.deepEqual(Object.keys(e), [
    'version',
    'routeKey',
    'rawPath',
    'rawQueryString',
    'headers',
    'requestContext',
    'isBase64Encoded',
  ]);
  assert.equal(e.rawQueryString, '');
  assert.deepEqual(e.headers, { host: 'example.test' });
  assert.equal(e.isBase64Encoded, false);
  assert.equal(e.requestContext.domainName, 'abc.lambda-url.local');
  assert.equal(e.requestContext.domainPrefix, 'abc');
  assert.equal(e.requestContext.http.method, 'GET');
  assert.equal(e.requestContext.http.userAgent, '');
});

test('plain: query string decoding', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const r = await c.invoke({ query: 'q=a+b&x=%E2%9C%93&flag&empty=&bad=%zz&&k%20y=v&toString=1' });
  const e = JSON.parse(r.body.toString()).event;
  assert.deepEqual(e.queryStringParameters, {
    q: 'a b',
    x: '\u2713',
    flag: '',
    empty: '',
    bad: '%zz',
    'k y': 'v',
    toString: '1',
  });
});

test('plain: text vs base64 request bodies', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const cases = [
    ['text/plain; charset=utf-8', Buffer.from('héllo'), false],
    ['application/json', Buffer.from('{"a":1}'), false],
    ['application/vnd.api+json', Buffer.from('{}'), false],
    ['application/atom+xml', Buffer.from('<a/>'), false],
    ['application/x-www-form-urlencoded', Buffer.from('a=1&b=2'), false],
    ['Application/XML', Buffer.from('<a/>'), false],
    ['application/javascript', Buffer.from('1;'), false],
    ['application/octet-stream', Buffer.from('plain ascii'), true],
    ['image/png', Buffer.from([0x89, 0x50, 0x4e, 0x47]), true],
    ['text/plain', Buffer.from([0x66, 0xff, 0xfe]), true], // not valid UTF-8
    // The shim decodes first and checks the bytes only when the text holds a
    // U+FFFD: one sent as such is text, one the decoder made is not.
    ['text/plain', Buffer.from('a \ufffd b'), false],
    ['application/json', Buffer.from([0x22, 0xc3, 0x28, 0x22]), true], // broken two-byte sequence
    ['application/json', Buffer.from([0x22, 0xed, 0xa0, 0x80, 0x22]), true], // a surrogate, encoded
    ['text/plain', Buffer.from([0xc0, 0xaf]), true], // an overlong '/'
    ['text/plain', Buffer.from([0xef, 0xbf, 0xbd, 0xff]), true], // a real U+FFFD, then a bad byte
    [null, Buffer.from('no content type'), true],
    ['multipart/form-data; boundary=x', Buffer.from('--x--'), true],
  ];
  for (const [ct, body, b64] of cases) {
    const headers = ct ? [['content-type', ct]] : [];
    const r = await c.invoke({ method: 'POST', headers }, body);
    const e = JSON.parse(r.body.toString()).event;
    assert.equal(e.isBase64Encoded, b64, `content-type ${ct}`);
    assert.equal(e.body, b64 ? body.toString('base64') : body.toString('utf8'), `content-type ${ct}`);
  }
});

test('plain: results without statusCode become 200 application/json', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const cases = [
    [{ a: 1, b: [true, null] }, '{"a":1,"b":[true,null]}'],
    [[1, 'two'], '[1,"two"]'],
    [42, '42'],
    ['Hello, world!', '"Hello, world!"'],
    [null, 'null'],
    [false, 'false'],
  ];
  for (const [value, text] of cases) {
    const r = await c.invoke({ method: 'POST', path: '/result', headers: [['content-type', 'application/json']] }, JSON.stringify({ value }));
    assert.equal(r.type, T.RESPONSE);
    assert.deepEqual(r.meta, { status: 200, headers: [['content-type', 'application/json']] });
    assert.equal(r.body.toString(), text);
  }
});

test('plain: headers, multiValueHeaders and cookies translation', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const r = await c.invoke({ path: '/headers' });
  assert.equal(r.type, T.RESPONSE);
  assert.deepEqual(r.meta, {
    status: 201,
    headers: [
      ['x-single', 'one'],
      ['x-number', '42'],
      ['x-multi', 'a'],
      ['x-multi', 'b'],
      ['set-cookie', 'a=1; Path=/'],
      ['set-cookie', 'b=2'],
    ],
  });
  assert.equal(r.body.toString(), 'made');
});

test('plain: response headers of any text keep JSON.stringify\'s exact encoding', async () => {
  // The shim writes the RESPONSE metadata itself (not through JSON.stringify):
  // quotes, backslashes, control characters, DEL, non-ASCII, astral and lone
  // surrogates must come out byte for byte as JSON.stringify writes them.
  const values = ['plain', '', 'q"uote', 'back\\slash', 'tab\tnl\ncr\r', '\u0001\u001f', 'del\u007f',
    'caf\u00e9', '\u2028\u2029', '\ud83d\ude00', 'lone\ud800', 'lone\udc00end', '</script>'];
  const dir = tmpFixture({
    'index.js': `const v = ${JSON.stringify(values)};
exports.handler = async () => ({ statusCode: 203, headers: Object.fromEntries(v.map((x, i) => ['X-H' + i + (i === 3 ? '"\\\\' : ''), x])), body: '' });`,
  });
  const c = await ready(dir, 'index.handler');
  const r = await c.invoke({ path: '/' });
  assert.equal(r.type, T.RESPONSE, r.metaText);
  const headers = values.map((x, i) => ['x-h' + i + (i === 3 ? '"\\' : ''), x]);
  assert.equal(r.metaText, JSON.stringify({ status: 203, headers }));
});

test('plain: a throwing handler answers ERROR and the instance stays warm', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const a = await c.invoke({ path: '/' });
  assert.equal(JSON.parse(a.body.toString()).count, 1);
  const e = await c.invoke({ path: '/error', request_id: 'req-err' });
  assert.equal(e.type, T.ERROR);
  assert.deepEqual(e.meta, { errorType: 'TypeError', errorMessage: 'plain fixture failed on purpose' });
  assert.equal(e.body.length, 0);
  const b = await c.invoke({ path: '/' });
  assert.equal(JSON.parse(b.body.toString()).count, 3);
  assert.match(c.stderr, /req-err\tERROR\tInvoke Error/);
});

test('raw (service API) invocations: the body is the event, the result goes back as JSON', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  // A result with statusCode is not translated: it is the payload itself.
  const r = await c.invoke({ raw: true, request_id: 'raw-1' }, JSON.stringify({ rawPath: '/headers' }));
  assert.equal(r.type, T.RESPONSE);
  assert.deepEqual(r.meta, { status: 200, headers: [['content-type', 'application/json']] });
  const payload = JSON.parse(r.body.toString());
  assert.equal(payload.statusCode, 201);
  assert.deepEqual(payload.cookies, ['a=1; Path=/', 'b=2']);
  // A handler error carries the stack as `trace`.
  const e = await c.invoke({ raw: true, request_id: 'raw-2' }, JSON.stringify({ rawPath: '/error' }));
  assert.equal(e.type, T.ERROR);
  assert.equal(e.meta.errorType, 'TypeError');
  assert.equal(e.meta.errorMessage, 'plain fixture failed on purpose');
  assert.ok(Array.isArray(e.meta.trace) && e.meta.trace[0].startsWith('TypeError'), JSON.stringify(e.meta));
  assert.match(c.stderr, /raw-2\tERROR\tInvoke Error/);
  // An empty body is a null event; malformed JSON is refused, the instance stays.
  const n = await c.invoke({ raw: true }, '');
  assert.equal(n.type, T.ERROR, 'null event: the fixture reads event.rawPath and throws');
  const bad = await c.invoke({ raw: true }, '{not json');
  assert.equal(bad.type, T.ERROR);
  assert.equal(bad.meta.errorType, 'Runtime.InvalidFrame');
  const ok = await c.invoke({ path: '/' });
  assert.equal(ok.type, T.RESPONSE);
});

test('streaming: streamifyResponse handlers answer STREAM_HEAD, chunks as written, STREAM_END', async () => {
  const dir = tmpFixture({
    'index.js': `
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
exports.handler = awslambda.streamifyResponse(async (event, rs, context) => {
  const p = event.rawPath || event.mode;
  if (p === '/meta') {
    rs = awslambda.HttpResponseStream.from(rs, {
      statusCode: 418, headers: { 'X-A': '1', 'Content-Length': '9' }, cookies: ['c=1'] });
    rs.write('a');
    rs.write(Buffer.alloc(100000, 'b'));
    rs.end('c');
    return;
  }
  if (p === '/early') throw new Error('before any byte');
  if (p === '/late') { rs.write('x'); await sleep(10); throw new TypeError('after a byte'); }
  if (p === '/open') { rs.setContentType('text/plain'); rs.write('left open'); return; }
  rs.end(context.awsRequestId);
});
`,
  });
  const c = await ready(dir, 'index.handler');
  const run = async (over, body) => {
    const id = c.nextId++;
    c.send(T.INVOKE, id, ShimClient.invokeMeta(over), body);
    const frames = [];
    for (;;) {
      const f = await c.next((x) => x.id === id);
      frames.push(f);
      if (f.type === T.STREAM_END || f.type === T.ERROR || f.type === T.RESPONSE) return frames;
    }
  };
  const meta = await run({ path: '/meta' });
  assert.deepEqual(meta[0].meta, {
    status: 418,
    headers: [['content-type', 'application/octet-stream'], ['x-a', '1'], ['set-cookie', 'c=1']],
  });
  const chunks = meta.filter((f) => f.type === T.STREAM_CHUNK);
  assert.ok(chunks.every((f) => f.body.length <= 64 * 1024), 'chunks of at most 64 KiB');
  assert.equal(Buffer.concat(chunks.map((f) => f.body)).toString(), 'a' + 'b'.repeat(100000) + 'c');
  assert.equal(meta.at(-1).type, T.STREAM_END);
  assert.equal(meta.at(-1).meta, null, 'a complete stream ends without error');

  const early = await run({ path: '/early' });
  assert.deepEqual(early.map((f) => f.type), [T.ERROR], 'nothing streamed: a plain ERROR');
  assert.equal(early[0].meta.errorMessage, 'before any byte');

  const late = await run({ path: '/late' });
  assert.deepEqual(late.map((f) => f.type), [T.STREAM_HEAD, T.STREAM_CHUNK, T.STREAM_END]);
  assert.equal(late[2].meta.errorType, 'TypeError');
  assert.equal(late[2].meta.errorMessage, 'after a byte');

  const open = await run({ path: '/open' });
  assert.deepEqual(open.map((f) => f.type), [T.STREAM_HEAD, T.STREAM_CHUNK, T.STREAM_END]);
  assert.deepEqual(open[0].meta.headers, [['content-type', 'text/plain']]);

  const raw = await run({ raw: true, request_id: 'raw-s' }, JSON.stringify({ mode: 'id' }));
  assert.equal(Buffer.concat(raw.filter((f) => f.type === T.STREAM_CHUNK).map((f) => f.body)).toString(), 'raw-s');
});

test('later HELLO answers READY at once and only refreshes env', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler', { env: { GREETING: 'one' } });
  const first = await c.invoke({});
  assert.equal(JSON.parse(first.body.toString()).env.GREETING, 'one');
  const again = await c.hello('/nonexistent', 'other.handler', { env: { GREETING: 'two' } });
  assert.equal(again.type, T.READY);
  const second = await c.invoke({});
  const out = JSON.parse(second.body.toString());
  assert.equal(out.env.GREETING, 'two');
  assert.equal(out.env._HANDLER, 'index.handler');
  assert.equal(out.count, 2, 'the module was not reloaded');
});

test('function env may override the region and TZ defaults, not identity variables', async () => {
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler', {
    function: FID,
    env: { AWS_REGION: 'eu-west-1', TZ: 'Europe/Paris', _HANDLER: 'x.y', LAMBDA_TASK_ROOT: '/x' },
  });
  const out = JSON.parse((await c.invoke({})).body.toString());
  assert.equal(out.env.AWS_REGION, 'eu-west-1');
  assert.equal(out.env.TZ, 'Europe/Paris');
  assert.equal(out.env._HANDLER, 'index.handler');
  assert.equal(out.env.LAMBDA_TASK_ROOT, path.join(FIXTURES, 'plain'));
  assert.equal(out.context.invokedFunctionArn, `arn:aws:lambda:eu-west-1:000000000000:function:${FID}`);
});

test('invokes pipelined or sent before READY are answered in order', async () => {
  const c = shim();
  // INVOKE before HELLO waits for the handler.
  const early = c.invoke({ path: '/early' });
  const f = await c.hello(path.join(FIXTURES, 'plain'), 'index.handler');
  assert.equal(f.type, T.READY);
  assert.equal(JSON.parse((await early).body.toString()).path, '/early');
  const all = await Promise.all([1, 2, 3, 4, 5].map((i) => c.invoke({ path: `/p${i}` })));
  assert.deepEqual(
    all.map((r) => JSON.parse(r.body.toString()).path),
    ['/p1', '/p2', '/p3', '/p4', '/p5'],
  );
});

test('invokes read in several chunks at once are answered in order, each with its body', async () => {
  // 40 INVOKEs in one write, more than one socket read holds: the first read's
  // invocation ends while the rest are queued, and an INVOKE from the next
  // read must queue behind them, not run ahead.
  // Each body is its own letter: a queued body that still pointed into the
  // reused read buffer would come back as a later read's bytes. 40 x 4 kB is
  // well over two reads of the shim's READ_BUF_LEN (64 KiB).
  const c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  const ids = [];
  const bodies = [];
  const frames = [];
  for (let i = 0; i < 40; i++) {
    const id = 5000 + i;
    ids.push(id);
    bodies.push(String.fromCharCode(0x41 + (i % 26)).repeat(4096));
    const meta = ShimClient.invokeMeta({ method: 'POST', path: `/o${i}`, headers: [['content-type', 'text/plain']] });
    frames.push(encodeFrame(T.INVOKE, id, meta, Buffer.from(bodies[i])));
  }
  const answers = ids.map((id) => c.next((f) => f.id === id && (f.type === T.RESPONSE || f.type === T.ERROR)));
  c.writeRaw(Buffer.concat(frames));
  const got = await Promise.all(answers);
  got.forEach((a, i) => {
    assert.equal(a.type, T.RESPONSE, a.metaText);
    assert.equal(JSON.parse(a.body.toString()).body, bodies[i], `body of invocation ${i}`);
  });
  assert.deepEqual(
    c.order.filter((f) => f.type === T.RESPONSE && ids.includes(f.id)).map((f) => f.id),
    ids,
  );
});

test('frames split at every byte and large bodies', async () => {
  const c = await ready(path.join(FIXTURES, 'binary'), 'index.handler');
  const body = Buffer.alloc(3 << 20);
  for (let i = 0; i < body.length; i++) body[i] = (i * 7 + 3) & 0xff;
  const id = 9000;
  const frame = encodeFrame(
    T.INVOKE,
    id,
    ShimClient.invokeMeta({ method: 'POST', headers: [['content-type', 'application/octet-stream']] }),
    body,
  );
  const want = c.next((f) => f.id === id);
  // The first 200 bytes one at a time (header and meta split everywhere), the rest in one go.
  for (let i = 0; i < 200; i++) {
    c.writeRaw(frame.subarray(i, i + 1));
    if (i % 16 === 0) await new Promise((r) => setImmediate(r));
  }
  c.writeRaw(frame.subarray(200));
  const r = await want;
  assert.equal(r.type, T.RESPONSE);
  assert.ok(r.body.equals(body));
});

test('frames keep their order and bytes while the host is not reading', async () => {
  // The first answers (384 kB each) are larger than the socket's buffer: the
  // shim writes what the socket takes at once and queues the rest on the
  // stream, and every later frame (LOG and RESPONSE, also those made while
  // the queue drains) must wait behind it.
  const dir = tmpFixture({
    'index.js':
      'exports.handler = async (event) => {\n' +
      "  console.log('answering ' + event.rawPath);\n" +
      "  return { statusCode: 200, body: event.rawPath.repeat(event.rawPath.startsWith('/big') ? 1 << 16 : 4) };\n" +
      '};\n',
  });
  const c = await ready(dir, 'index.handler');
  c.sock.pause();
  const paths = ['/big-a', '/big-b', '/big-c'];
  const answers = paths.map((p) => c.invoke({ path: p }));
  await new Promise((r) => setTimeout(r, 300));
  // Small answers produced while the big ones are still draining.
  c.sock.resume();
  for (let i = 0; i < 20; i++) {
    paths.push(`/${i}`);
    answers.push(c.invoke({ path: `/${i}` }));
    await new Promise((r) => setImmediate(r));
  }
  const got = await Promise.all(answers);
  got.forEach((r, i) => {
    assert.equal(r.type, T.RESPONSE);
    const want = paths[i].repeat(paths[i].startsWith('/big') ? 1 << 16 : 4);
    assert.ok(r.body.equals(Buffer.from(want)), `body of ${paths[i]}`);
  });
  // Per invocation: its LOG, then its RESPONSE, invocations in order.
  const ids = got.map((r) => r.id);
  const seq = c.order.filter((f) => ids.includes(f.id)).map((f) => `${f.type}:${f.id}`);
  assert.deepEqual(
    seq,
    ids.flatMap((id) => [`${T.LOG}:${id}`, `${T.RESPONSE}:${id}`]),
  );
});

test('esm: .mjs handler with top-level await', async () => {
  const c = await ready(path.join(FIXTURES, 'esm'), 'app.handler');
  const r = await c.invoke({ method: 'PUT', path: '/thing' });
  assert.deepEqual(r.meta, { status: 200, headers: [['content-type', 'text/plain']] });
  assert.equal(r.body.toString(), 'esm ok PUT /thing');
});

test('console output travels as LOG frames tagged with the invocation, before its answer', async () => {
  const dir = tmpFixture({
    'index.js': `
      const fs = require('fs');
      console.log('init line');
      exports.handler = async (event) => {
        console.log('line one');
        console.error('to stderr');
        process.stdout.write('no newline');
        fs.writeSync(1, 'raw write\\n');
        if (event.rawPath === '/big') process.stdout.write('x'.repeat(200 * 1024) + '\\n');
        return 'ok';
      };`,
  });
  const c = await ready(dir, 'index.handler');
  const initLogs = c.logs.splice(0);
  assert.deepEqual(initLogs, [{ id: 0, stream: 'stdout', text: 'init line\n' }]);
  c.order.length = 0;
  const r = await c.invoke({});
  assert.equal(r.type, T.RESPONSE, r.metaText);
  const mine = c.logs.filter((l) => l.id === r.id);
  assert.deepEqual(mine, [
    { id: r.id, stream: 'stdout', text: 'line one\n' },
    { id: r.id, stream: 'stderr', text: 'to stderr\n' },
    { id: r.id, stream: 'stdout', text: 'no newline' },
  ]);
  const answerAt = c.order.findIndex((f) => f.type === T.RESPONSE);
  assert.ok(
    c.order.slice(0, answerAt).filter((f) => f.type === T.LOG).length === 3,
    JSON.stringify(c.order),
  );
  // Raw writes to fd 1 bypass the frames (the agent captures that pipe).
  await new Promise((r) => setTimeout(r, 50));
  assert.match(c.stdout, /raw write/);
  assert.ok(!c.logs.some((l) => l.text.includes('raw write')));
  // Large output is cut into frames of at most 64 KiB.
  c.logs.length = 0;
  const big = await c.invoke({ path: '/big' });
  assert.equal(big.type, T.RESPONSE);
  const chunks = c.logs.filter((l) => l.id === big.id && l.text.startsWith('x'));
  assert.ok(chunks.length >= 4, `${chunks.length} chunks`);
  assert.ok(chunks.every((l) => Buffer.byteLength(l.text) <= 64 * 1024));
  assert.equal(chunks.map((l) => l.text).join('').length, 200 * 1024 + 1);
});

test('output right before process.exit() is not lost; chunks end between characters', async () => {
  const dir = tmpFixture({
    'index.js': `exports.handler = async (event) => {
      if (event.rawPath === '/wide') { console.log('é'.repeat(40000)); return 'ok'; }
      console.error('last words');
      process.exit(2);
    };`,
  });
  const c = await ready(dir, 'index.handler');
  const wide = await c.invoke({ path: '/wide' });
  assert.equal(wide.type, T.RESPONSE);
  const pieces = c.logs.filter((l) => l.id === wide.id).map((l) => l.text);
  assert.ok(pieces.length >= 2, `${pieces.length} pieces`);
  assert.ok(pieces.every((t) => !t.includes('\ufffd')), 'a chunk split a character');
  assert.equal(pieces.join(''), 'é'.repeat(40000) + '\n');
  c.invoke({ path: '/bye' }).catch(() => {});
  const exit = await c.exit;
  assert.equal(exit.code, 2);
  assert.ok(c.logs.some((l) => l.stream === 'stderr' && l.text === 'last words\n'), JSON.stringify(c.logs));
});

test('callback: result, error, and a second callback is ignored', async () => {
  const c = await ready(path.join(FIXTURES, 'callback'), 'index.handler');
  const r = await c.invoke({ path: '/x' });
  assert.deepEqual(r.meta, { status: 201, headers: [['content-type', 'text/plain']] });
  assert.equal(r.body.toString(), 'callback ok /x');
  const e = await c.invoke({ path: '/fail' });
  assert.equal(e.type, T.ERROR);
  assert.deepEqual(e.meta, { errorType: 'RangeError', errorMessage: 'callback fixture failed on purpose' });
  await noFrameWithin(c, () => true, 100);
});

test('binary: base64 answers and binary request bodies', async () => {
  const c = await ready(path.join(FIXTURES, 'binary'), 'index.handler');
  const all = Buffer.alloc(256);
  for (let i = 0; i < 256; i++) all[i] = i;
  const g = await c.invoke({});
  assert.deepEqual(g.meta, {
    status: 200,
    headers: [
      ['content-type', 'application/octet-stream'],
      ['x-request-base64', 'false'],
    ],
  });
  assert.ok(g.body.equals(all));
  const bin = Buffer.from([0, 1, 2, 0xff, 0xfe, 0x80, 0x0d, 0x0a]);
  const p = await c.invoke({ method: 'POST', headers: [['content-type', 'application/octet-stream']] }, bin);
  assert.equal(p.meta.headers[1][1], 'true');
  assert.ok(p.body.equals(bin));
  const t = await c.invoke({ method: 'POST', headers: [['content-type', 'text/plain']] }, 'snowman \u2603');
  assert.equal(t.meta.headers[1][1], 'false');
  assert.equal(t.body.toString(), 'snowman \u2603');
});

test('express + serverless-http', { skip: !HAVE_EXPRESS && 'run `npm ci` in tests/fixtures/express-app' }, async (t) => {
  const c = await ready(EXPRESS_DIR, 'app.handler');
  const hdr = (r, name) => r.meta.headers.filter(([k]) => k === name).map(([, v]) => v);

  await t.test('GET /', async () => {
    const r = await c.invoke({ path: '/' });
    assert.deepEqual(r.meta, {
      status: 200,
      headers: [
        ['x-powered-by', 'Express'],
        ['content-type', 'text/plain; charset=utf-8'],
        ['etag', 'W/"11-zItbALq2B7+L35cngYyTVEo8Dlw"'],
      ],
    });
    assert.equal(r.body.toString(), 'Hello from hearth');
  });

  await t.test('POST /greet', async () => {
    const r = await c.invoke(
      { method: 'POST', path: '/greet', headers: [['content-type', 'application/json']] },
      '{"name":"hearth"}',
    );
    assert.equal(r.meta.status, 200);
    assert.deepEqual(hdr(r, 'content-type'), ['application/json; charset=utf-8']);
    assert.equal(r.body.toString(), '{"message":"Hello, hearth"}');
  });

  await t.test('GET /q', async () => {
    const r = await c.invoke({ path: '/q', query: 'a=1&b=2&a=3&s=x+y%21' });
    assert.deepEqual(JSON.parse(r.body.toString()), { a: ['1', '3'], b: '2', s: 'x y!' });
  });

  await t.test('GET /cookie', async () => {
    const r = await c.invoke({ path: '/cookie', headers: [['cookie', 'a=1; b=2']] });
    assert.equal(r.meta.status, 200);
    assert.deepEqual(hdr(r, 'set-cookie'), ['session=abc123; Path=/', 'theme=dark; Path=/; HttpOnly']);
    assert.equal(r.body.toString(), '{"cookie":"a=1; b=2"}');
    const none = await c.invoke({ path: '/cookie' });
    assert.equal(none.body.toString(), '{"cookie":null}');
  });

  await t.test('GET /redirect', async () => {
    const r = await c.invoke({ path: '/redirect' });
    assert.equal(r.meta.status, 302);
    assert.deepEqual(hdr(r, 'location'), ['/']);
  });

  await t.test('GET /bin', async () => {
    const r = await c.invoke({ path: '/bin' });
    const all = Buffer.alloc(256);
    for (let i = 0; i < 256; i++) all[i] = i;
    assert.deepEqual(hdr(r, 'content-type'), ['application/octet-stream']);
    assert.ok(r.body.equals(all));
  });

  await t.test('POST /echo-bin', async () => {
    const bin = Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x10]);
    const r = await c.invoke(
      { method: 'POST', path: '/echo-bin', headers: [['content-type', 'application/octet-stream']] },
      bin,
    );
    assert.equal(r.meta.status, 200);
    assert.ok(r.body.equals(bin));
  });

  await t.test('unknown route', async () => {
    const r = await c.invoke({ path: '/missing' });
    assert.equal(r.meta.status, 404);
  });
});

// --------------------------------------------------------------------------
// Init failures.

async function initError(dir, handler) {
  const c = shim();
  const f = await c.hello(dir, handler);
  assert.equal(f.type, T.INIT_ERROR, f.metaText);
  return { c, f };
}

test('init error: module throws while loading; process stays up', async () => {
  const { c, f } = await initError(path.join(FIXTURES, 'init-error'), 'index.handler');
  assert.equal(f.meta.errorType, 'Error');
  assert.equal(f.meta.errorMessage, 'init-error fixture fails while loading');
  assert.ok(Array.isArray(f.meta.stack) && f.meta.stack[0].startsWith('Error: init-error fixture'));
  assert.equal(c.stdout, 'init-error fixture: about to fail\n');
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(c.child.exitCode, null, 'still running');
  const e = await c.invoke({});
  assert.equal(e.type, T.ERROR);
  assert.equal(e.meta.errorType, 'Error');
  const again = await c.hello(path.join(FIXTURES, 'init-error'), 'index.handler');
  assert.equal(again.type, T.INIT_ERROR);
});

test('init error: handler not exported', async () => {
  const { f } = await initError(path.join(FIXTURES, 'no-export'), 'index.handler');
  assert.deepEqual(f.meta, {
    errorType: 'Runtime.HandlerNotFound',
    errorMessage: 'index.handler is undefined or not exported',
    stack: [],
  });
});

test('init error: missing module, bad handler string, syntax error, not a function, missing dependency', async () => {
  let r = await initError(path.join(FIXTURES, 'plain'), 'nope.handler');
  assert.equal(r.f.meta.errorType, 'Runtime.ImportModuleError');
  assert.equal(r.f.meta.errorMessage, "Error: Cannot find module 'nope'");

  r = await initError(path.join(FIXTURES, 'plain'), 'index');
  assert.equal(r.f.meta.errorType, 'Runtime.MalformedHandlerName');

  const dir = tmpFixture({
    'broken.js': 'exports.handler = async () => {;\n',
    'value.js': 'exports.handler = 42;\n',
    'dep.js': "require('definitely-not-installed-xyz');\nexports.handler = async () => 1;\n",
  });
  r = await initError(dir, 'broken.handler');
  assert.equal(r.f.meta.errorType, 'Runtime.UserCodeSyntaxError');
  assert.match(r.f.meta.errorMessage, /^SyntaxError: /);

  r = await initError(dir, 'value.handler');
  assert.deepEqual(r.f.meta, {
    errorType: 'Runtime.HandlerNotFound',
    errorMessage: 'value.handler is not a function',
    stack: [],
  });

  r = await initError(dir, 'dep.handler');
  assert.equal(r.f.meta.errorType, 'Runtime.ImportModuleError');
  assert.match(r.f.meta.errorMessage, /^Error: Cannot find module 'definitely-not-installed-xyz'/);
});

// --------------------------------------------------------------------------
// Handler resolution and calling conventions.

test('resolution: type=module .js, nested path and export, dotted file name, .cjs, directory', async () => {
  const dir = tmpFixture({
    'esm/package.json': '{"type":"module"}',
    'esm/main.js': 'export const handler = async () => ({ statusCode: 200, body: "esm-js" });\n',
    'src/lib/api.js': 'exports.routes = { http: async () => ({ statusCode: 200, body: "nested" }) };\n',
    'app.v2.js': 'exports.handler = async () => ({ statusCode: 200, body: "dotted" });\n',
    'old.cjs': 'module.exports.handler = async () => ({ statusCode: 200, body: "cjs" });\n',
    'pkgdir/index.js': 'exports.handler = async () => ({ statusCode: 200, body: "dir" });\n',
  });
  for (const [handler, body] of [
    ['esm/main.handler', 'esm-js'],
    ['src/lib/api.routes.http', 'nested'],
    ['app.v2.handler', 'dotted'],
    ['old.handler', 'cjs'],
    ['pkgdir.handler', 'dir'],
  ]) {
    const c = await ready(dir, handler);
    const r = await c.invoke({});
    assert.equal(r.body.toString(), body, handler);
    c.close();
  }
});

test('calling conventions: sync value, context.succeed, callback(null) + no promise, empty event loop', async () => {
  const dir = tmpFixture({
    'sync.js': 'exports.handler = (e) => ({ statusCode: 202, body: "sync" });\n',
    'legacy.js':
      'exports.handler = function (e, ctx) { setTimeout(() => ctx.succeed({ statusCode: 200, body: "succeed" }), 1); };\n',
    'legacyfail.js': 'exports.handler = function (e, ctx) { const { fail } = ctx; setTimeout(() => fail(new SyntaxError("f")), 1); };\n',
    'drain.js': 'exports.handler = function (e, ctx, cb) { setTimeout(() => {}, 5); };\n',
    'cbstring.js': 'exports.handler = function (e, ctx, cb) { cb("plain string error"); };\n',
    'asynccb.js':
      'exports.handler = async function (e, ctx, cb) { cb(null, { statusCode: 200, body: "cb first" }); return { statusCode: 500 }; };\n',
    'reject.js': 'exports.handler = async () => { throw { name: "Custom", message: "obj" }; };\n',
  });
  let c = await ready(dir, 'sync.handler');
  let r = await c.invoke({});
  assert.deepEqual([r.meta.status, r.body.toString()], [202, 'sync']);

  c = await ready(dir, 'legacy.handler');
  r = await c.invoke({});
  assert.deepEqual([r.meta.status, r.body.toString()], [200, 'succeed']);

  c = await ready(dir, 'legacyfail.handler');
  r = await c.invoke({});
  assert.deepEqual(r.meta, { errorType: 'SyntaxError', errorMessage: 'f' });

  // Never answers; once the event loop is empty the result is null (Lambda).
  c = await ready(dir, 'drain.handler');
  r = await c.invoke({});
  assert.equal(r.type, T.RESPONSE);
  assert.equal(r.body.toString(), 'null');
  r = await c.invoke({}); // and the instance keeps serving
  assert.equal(r.body.toString(), 'null');

  c = await ready(dir, 'cbstring.handler');
  r = await c.invoke({});
  assert.deepEqual(r.meta, { errorType: 'string', errorMessage: 'plain string error' });

  c = await ready(dir, 'asynccb.handler');
  r = await c.invoke({});
  assert.equal(r.body.toString(), 'cb first');
  await noFrameWithin(c, () => true, 50);

  c = await ready(dir, 'reject.handler');
  r = await c.invoke({});
  assert.deepEqual(r.meta, { errorType: 'Custom', errorMessage: 'obj' });
});

test('malformed results answer ERROR', async () => {
  const dir = tmpFixture({
    'bad.js':
      'exports.handler = async (e) => e.rawPath === "/status" ? { statusCode: "abc" } : (() => { const o = {}; o.o = o; return o; })();\n',
  });
  const c = await ready(dir, 'bad.handler');
  let r = await c.invoke({ path: '/status' });
  assert.equal(r.type, T.ERROR);
  assert.equal(r.meta.errorType, 'Runtime.MalformedResponse');
  r = await c.invoke({ path: '/circular' });
  assert.equal(r.type, T.ERROR);
  assert.equal(r.meta.errorType, 'Runtime.MalformedResponse');
});

test('uncaught exception during an invoke: ERROR, then the process exits', async () => {
  const dir = tmpFixture({
    'crash.js': 'exports.handler = async () => { setTimeout(() => { throw new EvalError("boom"); }, 1); return new Promise(() => {}); };\n',
    'rej.js': 'exports.handler = async () => { Promise.reject(new Error("nobody listens")); return new Promise(() => {}); };\n',
  });
  let c = await ready(dir, 'crash.handler');
  let r = await c.invoke({});
  assert.equal(r.type, T.ERROR);
  assert.deepEqual(r.meta, { errorType: 'EvalError', errorMessage: 'boom' });
  let ex = await c.exit;
  assert.notEqual(ex.code, 0);

  c = await ready(dir, 'rej.handler');
  r = await c.invoke({});
  assert.equal(r.type, T.ERROR);
  assert.deepEqual(r.meta, {
    errorType: 'Runtime.UnhandledPromiseRejection',
    errorMessage: 'Error: nobody listens',
  });
  ex = await c.exit;
  assert.notEqual(ex.code, 0);
});

test('broken stream: bad magic closes the runtime; agent EOF ends it', async () => {
  let c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  c.writeRaw(Buffer.alloc(16, 0x41));
  let ex = await c.exit;
  assert.notEqual(ex.code, 0);
  assert.match(c.stderr, /bad magic/);

  c = await ready(path.join(FIXTURES, 'plain'), 'index.handler');
  c.sock.end();
  ex = await c.exit;
  assert.equal(ex.code, 0);
});
