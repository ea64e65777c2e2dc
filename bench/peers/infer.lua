-- wrk script shared by every server in bench/peers.sh: POSTs the body in $BODY; when
-- $HEADER_LEN is set the body is Triton's binary form (JSON header + raw tensor bytes).
-- Prints one machine-readable line: "WRK requests errors p50_us p99_us duration_us".
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
local hl = os.getenv("HEADER_LEN")
if hl and hl ~= "" then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = hl
else
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %.1f %.1f %d\n", summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
