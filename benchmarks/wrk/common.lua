-- Shared by the wrk scripts of benchmarks/ (wrk runs with this directory as its working
-- directory, so a script loads this file with dofile("common.lua")).

local counter = 0

-- Number the threads, so each seeds its random numbers differently.
function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

-- A validation request body from a keys-file line: KEY or KEY<TAB>FINGERPRINT.
function key_body(line)
  local key, fingerprint = line:match("^([^\t]+)\t?(.*)$")
  if fingerprint ~= "" then
    return '{"key":"' .. key .. '","fingerprint":"' .. fingerprint .. '"}'
  end
  return '{"key":"' .. key .. '"}'
end

-- One line benchmarks/harness.py reads: counts and latency percentiles in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KSJSON {"requests":%d,"duration_us":%d,"status_errors":%d,' ..
    '"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
