-- Loaded into every driver's Lua state before the driver itself.
-- Only text chunks may be loaded: bytecode can break out of the VM's safety checks.

local raw_load, raw_loadfile = load, loadfile
local BINARY_CHUNK = "binary chunks are not allowed"

local function is_binary(s)
  return type(s) == "string" and s:byte(1) == 27
end

function load(chunk, chunkname, _mode, env)
  if is_binary(chunk) then
    return nil, BINARY_CHUNK
  end
  return raw_load(chunk, chunkname, "t", env)
end

function loadstring(s, chunkname)
  if is_binary(s) then
    return nil, BINARY_CHUNK
  end
  return raw_load(s, chunkname, "t")
end

function loadfile(filename, _mode, env)
  return raw_loadfile(filename, "t", env)
end

function dofile(filename)
  local f, err = raw_loadfile(filename, "t")
  if not f then
    error(err, 2)
  end
  return f()
end

-- Each nested coroutine.resume runs on the C stack; unbounded nesting
-- (`local function f() return coroutine.wrap(f)() end`) would overflow it and take the
-- whole process down. Lua 5.1 limits C calls to 200 levels; so do we, with an error.
local raw_resume, raw_create = coroutine.resume, coroutine.create
local MAX_RESUME_DEPTH = 200
local resume_depth = 0

local function leave(...)
  resume_depth = resume_depth - 1
  return ...
end

function coroutine.resume(co, ...)
  if resume_depth >= MAX_RESUME_DEPTH then
    return false, "C stack overflow (coroutines nested too deeply)"
  end
  resume_depth = resume_depth + 1
  return leave(raw_resume(co, ...))
end

function coroutine.wrap(f)
  local co = raw_create(f)
  local function unwrap(ok, ...)
    if not ok then
      error((...), 0)
    end
    return ...
  end
  return function(...)
    return unwrap(coroutine.resume(co, ...))
  end
end
