-- A sensor that publishes its state as JSON over MQTT 5 and obeys a command topic.
--   state:   <prefix>/state  (QoS 1, retained, CONTENT_TYPE + MESSAGE_EXPIRY_INTERVAL)
--   command: <prefix>/set    payload {"interval_ms": 500} or {"report": true}
-- Run: luadriver run drivers/mqtt-sensor/driver.lua --embedded-broker
-- Watch: mosquitto_sub -V 5 -t 'luadriver/sensor/#' -v

local RECONNECT_MS = 3000

local mqtt = C4:MQTT(C4:GetDeviceID() .. "-mqtt-sensor")
local publish_timer, reconnect_timer
local reading = 20.0
local sent, acked = 0, 0

local function topic(suffix)
  return Properties["Topic Prefix"] .. "/" .. suffix
end

local function publish_state()
  reading = reading + (math.random() - 0.5)
  local code, id, err = mqtt:Publish(
    topic("state"),
    C4:JsonEncode({ temperature = math.floor(reading * 10 + 0.5) / 10, time = C4:GetTime("s") }),
    1,
    true,
    { CONTENT_TYPE = "application/json", MESSAGE_EXPIRY_INTERVAL = 300 }
  )
  if code == 0 then
    sent = sent + 1
  else
    C4:ErrorLog("publish failed: " .. code .. " " .. tostring(err))
  end
end

local function start_publishing(interval)
  if publish_timer then
    publish_timer:Cancel()
  end
  publish_timer = C4:SetTimer(interval, publish_state, true)
end

local function schedule_reconnect()
  if reconnect_timer then
    return
  end
  reconnect_timer = C4:SetTimer(RECONNECT_MS, function()
    reconnect_timer = nil
    mqtt:Reconnect()
  end)
end

mqtt:OnConnect(function(obj, rc, flags, message)
  print(("connected: %d %s"):format(rc, message))
  if rc == 0 then
    obj:Subscribe(topic("set"), 1)
    publish_state()
  else
    schedule_reconnect()
  end
end)

mqtt:OnDisconnect(function(_, rc, message)
  print(("disconnected: %d %s"):format(rc, message))
  if rc ~= 0 then
    schedule_reconnect()
  end
end)

mqtt:OnPublish(function(_, id, rc, message)
  if rc < 128 then
    acked = acked + 1
  else
    C4:ErrorLog(("message %d failed: %d %s"):format(id, rc, message))
  end
end)

mqtt:OnMessage(function(_, _, msg_topic, payload)
  local command, err = C4:JsonDecode(payload)
  if not command then
    C4:ErrorLog("bad command on " .. msg_topic .. ": " .. tostring(err))
    return
  end
  if command.interval_ms then
    start_publishing(tonumber(command.interval_ms))
    print("interval now " .. command.interval_ms .. " ms")
  end
  if command.report then
    publish_state()
  end
end)

function OnDriverLateInit()
  mqtt:ForceMqttVersion(5)
  mqtt:SetWill(topic("online"), "false", 1, true)
  mqtt:Connect(Properties["Broker Address"], tonumber(Properties["Broker Port"]), 30)
  start_publishing(tonumber(Properties["Publish Interval (ms)"]) or 2000)
end

function OnPropertyChanged(name)
  if name == "Publish Interval (ms)" then
    start_publishing(tonumber(Properties[name]) or 2000)
  end
end

function OnDriverDestroyed()
  print(("published %d, acknowledged %d"):format(sent, acked))
  mqtt:Disconnect()
end
