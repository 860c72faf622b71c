-- wrk script: POST one chat-completion body read from a file.
--   wrk -s benchmarks/body.lua URL -- BODY_FILE [BEARER_TOKEN]
-- The body is read once per thread in init(); wrk formats the request after init()
-- returns, so every request reuses the same preformatted bytes (no Lua per request).
function init(args)
  local path = args[1]
  if path == nil then
    error("usage: wrk -s body.lua URL -- BODY_FILE [BEARER_TOKEN]")
  end
  local f = assert(io.open(path, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[2] ~= nil and args[2] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end
