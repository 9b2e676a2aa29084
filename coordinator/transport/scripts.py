"""Lua sources for the steps that must be atomic. redis-py's Script runs them with EVALSHA and
reloads on NOSCRIPT. Every key a script touches is passed in KEYS and shares one hash tag."""

from __future__ import annotations

# Reset the idle time of entries this consumer still owns; return the ids it lost.
# KEYS: stream. ARGV: group, consumer, id...
RENEW_LEASES = """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# Claim entries again (delivery counter + 1) only where this consumer still owns them; an owned
# entry deleted while pending is acked (nothing is left to handle). Return the claimed entries.
# KEYS: stream. ARGV: group, consumer, id...
CLAIM_OWNED = """
local claimed = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
      redis.call('XACK', KEYS[1], ARGV[1], id)
    else
      local entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)[1]
      if entry then claimed[#claimed + 1] = entry end
    end
  end
end
return claimed
"""

# Back-date the delivery of entries this consumer still owns, so any peer may take them at
# once (the owner and the counter stay); entries a peer took over are left alone. Return the
# ids released. KEYS: stream. ARGV: group, consumer, idle_ms, id...
RELEASE_OWNED = """
local released = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    released[#released + 1] = id
  end
end
return released
"""

# Append one entry and (re)set the stream's time to live; returns the entry id.
# KEYS: stream. ARGV: data (the entry's single field "e"), ttl_ms.
ADD_EXPIRING = """
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
"""

# Ack entries, only those this consumer still owns when ARGV[3] == '1', and remember their
# message ids in the dedup window when ARGV[5] > 0. Return the refused stream ids.
# KEYS: stream, dedup. ARGV: group, consumer, check_owner, now_ms, window_ms,
#       stream_id1, message_id1, stream_id2, message_id2, ...
ACK = """
local refused = {}
local check = ARGV[3] == '1'
local now = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
for i = 6, #ARGV, 2 do
  local id = ARGV[i]
  local owned = true
  if check then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    owned = (p[1] ~= nil) and (p[1][2] == ARGV[2])
  end
  if owned then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    if window > 0 and ARGV[i + 1] ~= '' then
      redis.call('ZADD', KEYS[2], now + window, ARGV[i + 1])
    end
  else
    refused[#refused + 1] = id
  end
end
if window > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
return refused
"""

# Move one entry to the dead-letter stream and ack it, if this consumer owns it.
# KEYS: stream, dead_letters. ARGV: group, consumer, id, field1, value1, ...
DEAD_LETTER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then
  return false
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local dead_id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return dead_id
"""

# Delete a consumer only if it owns no pending entry (DELCONSUMER drops its PEL otherwise).
# KEYS: stream. ARGV: group, consumer.
DELETE_IDLE_CONSUMER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if p[1] then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Append entries to one stream; returns their ids. One command (and one parsed reply) for a
# whole batch costs the client ~1 us per entry against ~6 us for one XADD each.
# KEYS: stream. ARGV: data... (each becomes the entry's single field "e").
APPEND = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
return ids
"""

# Entries after a group's last-delivered id, counted server-side up to a cap: the group lag
# where XINFO GROUPS reports none (Redis 6.2; 7.x after some deletions).
# KEYS: stream. ARGV: last delivered id, cap.
COUNT_AFTER = """
local n = 0
local cursor = '(' .. ARGV[1]
local cap = tonumber(ARGV[2])
while n < cap do
  local batch = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', math.min(1000, cap - n))
  if #batch == 0 then break end
  n = n + #batch
  cursor = '(' .. batch[#batch][1]
end
return n
"""
