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
