-- wrk script: like body.lua, but every request carries a new Idempotency-Key
-- (the realistic production shape: the gateway claims and finishes a key per request).
--   wrk -s benchmarks/keyed.lua URL -- BODY_FILE BEARER_TOKEN
local counter = 0
local prefix = ""
local body = ""
local headers = {}

function init(args)
  local f = assert(io.open(args[1], "rb"))
  body = f:read("*a")
  f:close()
  headers["Content-Type"] = "application/json"
  if args[2] ~= nil and args[2] ~= "" then
    headers["Authorization"] = "Bearer " .. args[2]
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  prefix = string.format("bench-%08x", math.random(0, 0x7fffffff))
end

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = prefix .. "-" .. counter
  return wrk.format("POST", nil, headers, body)
end
