-- wrk reporter for bench/compare: prints one JSON line (prefixed WRKJSON) at the
-- end of the run. Only done() is defined: a response() hook would make wrk run
-- Lua on every response and slow the load generator down.
-- Latencies are in microseconds; errors.status counts responses with status > 399.

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
