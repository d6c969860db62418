-- The slots whose lease has not run out (InUseArgs).
return redis.call('ZCOUNT', K.slots, '(' .. now, '+inf')
