-- wrk script for perf/soak.sh: a paced loader. Each connection sends one request, waits for
-- its answer, then pauses SOAK_DELAY_MS before the next (wrk's delay()), so the rate is about
-- connections * 1000 / (SOAK_DELAY_MS + latency) per second: closed-loop per connection, not
-- wrk2's open-loop constant rate. SOAK_POST_JSON sends that text as a JSON POST body.
-- SOAK_COUNT=1 counts answers by status and prints "status <code> <count>" lines at the end.
local delay_ms = tonumber(os.getenv("SOAK_DELAY_MS") or "0")
local post = os.getenv("SOAK_POST_JSON")
if post and post ~= "" then
    wrk.method = "POST"
    wrk.body = post
    wrk.headers["Content-Type"] = "application/json"
end

function delay()
    return delay_ms
end

if os.getenv("SOAK_COUNT") == "1" then
    local threads = {}
    function setup(thread)
        table.insert(threads, thread)
    end
    function init()
        statuses = {}
    end
    function response(status)
        statuses[status] = (statuses[status] or 0) + 1
    end
    function done()
        local total = {}
        for _, thread in ipairs(threads) do
            for status, n in pairs(thread:get("statuses")) do
                total[status] = (total[status] or 0) + n
            end
        end
        for status, n in pairs(total) do
            io.write(string.format("status %d %d\n", status, n))
        end
    end
end
