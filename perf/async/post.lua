-- wrk script: POST a small JSON event with the headers in EXTRA_HEADERS
-- (one "name: value" per ';'), e.g. the invocation type and the bearer token.
wrk.method = "POST"
wrk.body = '{"n": 1}'
wrk.headers["content-type"] = "application/json"
for pair in string.gmatch(os.getenv("EXTRA_HEADERS") or "", "[^;]+") do
    local k, v = pair:match("^%s*([^:]+):%s*(.*)$")
    if k then wrk.headers[k] = v end
end
