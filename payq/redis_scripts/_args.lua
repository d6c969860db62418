-- The start of every payq script: its arguments by name (payq.redis_scripts).
--   A: ARGV[1] decoded: the fields of the script's arguments dataclass.
--   K: its keys by name (KEYS, in the order A.keys gives).
local A = cjson.decode(ARGV[1])
local K = {}
for i, name in ipairs(A.keys) do K[name] = KEYS[i] end
