-- A simulated thermostat: the room temperature drifts toward the setpoint while heating.
-- Shows timers, JSON, properties, commands and persisted values.
-- Run: luadriver run drivers/thermostat/driver.lua --for 5s

local STEP = 0.5 -- degrees per poll while heating

local state = {
  temperature = tonumber(C4:PersistGetValue("temperature")) or 18.0,
  heating = false,
}
local poll_timer

local function setpoint()
  return tonumber(Properties["Setpoint"]) or 21
end

local function report()
  print(C4:JsonEncode({
    temperature = state.temperature,
    setpoint = setpoint(),
    mode = Properties["Mode"],
    heating = state.heating,
  }))
end

local function poll()
  local target = setpoint()
  state.heating = Properties["Mode"] == "Heat" and state.temperature < target
  if state.heating then
    state.temperature = math.min(target, state.temperature + STEP)
  else
    state.temperature = math.max(10, state.temperature - STEP / 5)
  end
  C4:PersistSetValue("temperature", state.temperature)
  report()
end

local function start_polling()
  if poll_timer then
    poll_timer:Cancel()
  end
  local interval = tonumber(Properties["Poll Interval (ms)"]) or 1000
  poll_timer = C4:SetTimer(interval, poll, true)
end

local commands = {
  SET_SETPOINT = function(params)
    local value = tonumber(params.value)
    if not value then
      C4:ErrorLog("SET_SETPOINT needs a numeric 'value'")
      return
    end
    C4:UpdateProperty("Setpoint", tostring(value))
    report()
  end,
  GET_STATE = function()
    report()
  end,
}

function OnDriverInit(init_type)
  C4:DebugLog("init (" .. init_type .. "), starting at " .. state.temperature)
end

function OnDriverLateInit()
  start_polling()
  report()
end

function OnPropertyChanged(name)
  if name == "Poll Interval (ms)" then
    start_polling()
  end
  report()
end

function ExecuteCommand(command, params)
  local handler = commands[command]
  if handler then
    handler(params or {})
  else
    C4:ErrorLog("unknown command " .. tostring(command))
  end
end

function OnDriverDestroyed()
  if poll_timer then
    poll_timer:Cancel()
  end
  C4:DebugLog("stopped at " .. state.temperature)
end
