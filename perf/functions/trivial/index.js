'use strict';
// The smallest useful function: an async handler returning a short text.
exports.handler = async () => ({ statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'hello' });
