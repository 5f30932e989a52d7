-- benchmarks/validate.py's warm-up: arguments PATH KEYS_FILE. Walks the whole key list, pass
-- after pass.
dofile("common.lua")
local requests = {}
local position = 0

-- Each pass walks the list in a new random order: a fixed order would send key i to the same
-- connection (so the same worker) on every pass whenever the connections take turns evenly,
-- and each worker would cache only its share of the keys.
math.randomseed(os.time() + math.floor(os.clock() * 1000000))

function shuffle()
  for i = #requests, 2, -1 do
    local j = math.random(i)
    requests[i], requests[j] = requests[j], requests[i]
  end
end

function init(args)
  local path, keys_file = args[1], args[2]
  for line in io.lines(keys_file) do
    requests[#requests + 1] =
      wrk.format("POST", path, {["Content-Type"] = "application/json"}, key_body(line))
  end
  shuffle()  -- each wrk run (a round) starts its walk at a random place in a random order
end

function request()
  if position >= #requests then
    shuffle()
    position = 0
  end
  position = position + 1
  return requests[position]
end
