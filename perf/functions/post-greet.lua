-- wrk script: POST {"name": "John Doe"} as JSON (the Express /greet benchmark).
wrk.method = "POST"
wrk.body = '{ "name": "John Doe" }'
wrk.headers["Content-Type"] = "application/json"
