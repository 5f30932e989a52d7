-- benchmarks/ingest.py's load: arguments PATH BATCH TAG KEYS_FILE METER. BATCH 0 posts one
-- event per request (POST /v1/usage), else BATCH events (POST /v1/usage/batch). Every event
-- carries a fresh idempotency key: TAG-thread-request[-event].
dofile("common.lua")
local path, batch, tag, meter
local keys = {}
local seq = 0

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  path, batch, tag, meter = args[1], tonumber(args[2]), args[3], args[5]
  for line in io.lines(args[4]) do keys[#keys + 1] = line end
end

function request()
  seq = seq + 1
  local key = keys[math.random(#keys)]
  local prefix = tag .. "-" .. thread_id .. "-" .. seq
  local body
  if batch == 0 then
    body = '{"key":"' .. key .. '","meter":"' .. meter .. '","quantity":1,"idempotency_key":"'
      .. prefix .. '"}'
  else
    local events = {}
    for i = 1, batch do
      events[i] = '{"meter":"' .. meter .. '","quantity":1,"idempotency_key":"' .. prefix
        .. "-" .. i .. '"}'
    end
    body = '{"key":"' .. key .. '","events":[' .. table.concat(events, ",") .. ']}'
  end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
