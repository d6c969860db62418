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
-- Holders whose beats were trimmed (silent longer than A.keep_ms) leave no alias behind.
for _, holder in ipairs(redis.call('HKEYS', K.aliases)) do
    if not redis.call('ZSCORE', K.beats, holder) then
        redis.call('HDEL', K.aliases, holder)
    end
end
return found
