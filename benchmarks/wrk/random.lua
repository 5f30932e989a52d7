-- benchmarks/validate.py's load: arguments METHOD PATH [KEYS_FILE]. With a keys file, each
-- request POSTs a random one of its keys as JSON; without, every request is the same.
dofile("common.lua")
local requests = {}

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  local method, path, keys_file = args[1], args[2], args[3]
  if keys_file then
    for line in io.lines(keys_file) do
      requests[#requests + 1] =
        wrk.format(method, path, {["Content-Type"] = "application/json"}, key_body(line))
    end
  else
    requests[1] = wrk.format(method, path)
  end
end

function request()
  return requests[math.random(#requests)]
end
