-- The Dramatiq worker ids of the holders proven dead (DeadAliasesArgs; the rule of
-- known_dead.lua), each given once: its alias is taken out as it is returned, and comes
-- back with the holder's next beat if it was only frozen.
local since = heard(now)
local found = {}
for _, holder in ipairs(redis.call('ZRANGEBYSCORE', K.beats, since, now - A.dead_after_ms - 1)) do
    local alias = redis.call('HGET', K.aliases, holder)
    if alias then
        redis.call('HDEL', K.aliases, holder)
        table.insert(found, alias)
    end
end
return found
