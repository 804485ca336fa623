"""The protocol's state changes as Lua scripts: each one reads the job hash and changes it, the job
stream and the job's events in one atomic step, so that no two writers can interleave.

Fencing: every worker-side script takes the attempt number the worker was given at claim time and
does nothing (returns `stale`) when the job hash holds another one. A worker whose job was reclaimed
by another therefore cannot store a second result, acknowledge the other worker's delivery or
publish progress for it. A stream entry is acknowledged (XACK) and deleted (XDEL) only when its job
has reached a terminal status, so the stream's length is the backlog: queued plus in flight.
"""

from __future__ import annotations

from . import keys

REPLY_TTL_S = 60  # a waiting request takes its answer at once; this only bounds one nobody took
# A spec this small (a text-to-image request: a few hundred bytes) also rides in its stream entry, so
# that the worker that reads it can prepare the job while its claim is on the way (not counted in the
# backlog's bytes: at most this much a job, only while it is queued).
INLINE_SPEC_BYTES = 2048

# `notify` queues a webhook delivery when the job asked for this event (`webhook_events` is
# ",succeeded,failed,"): written in the same atomic step as the event, so none is lost or doubled.
_PRELUDE = f"""
local WEBHOOKS = '{keys.WEBHOOKS}'
local BYTES = '{keys.BACKLOG_BYTES_PREFIX}'
local JOB = '{keys.job("")}'
local RESULT = '{keys.result("")}'
local REPLY = '{keys.reply("")}'
local REPLY_TTL = {REPLY_TTL_S}
-- The answer of a request that waits for its images (`reply`, set at enqueue), once its job has
-- ended: status, times and error as JSON, a newline, then the PNG (none when it did not succeed), in
-- one list entry the gateway takes with BLPOP. Written once (the flag goes with it).
local function answer(job)
  local id, waiting = unpack(redis.call('HMGET', job, 'id', 'reply'))
  if not waiting then return end
  redis.call('HDEL', job, 'reply')
  local f = redis.call('HMGET', job, 'model', 'owner', 'status', 'error', 'created', 'started', 'finished')
  local head = cjson.encode({{id = id, model = f[1] or '', owner = f[2] or '', status = f[3],
    error = f[4] or '', created = f[5] or '', started = f[6] or '', finished = f[7] or ''}})
  redis.call('RPUSH', REPLY .. id, head .. '\\n' .. (redis.call('GET', RESULT .. id) or ''))
  redis.call('EXPIRE', REPLY .. id, REPLY_TTL)
end
-- Every change to a terminal status calls it (the waiting request's answer goes with it).
local function notify(job, kind, time)
  if kind ~= 'started' then answer(job) end
  local wanted = redis.call('HGET', job, 'webhook_events')
  if wanted and string.find(wanted, ',' .. kind .. ',', 1, true) then
    redis.call('XADD', WEBHOOKS, '*', 'job', redis.call('HGET', job, 'id'), 'type', kind, 'time', time,
      'attempt', 1)
  end
end
"""
_PRELUDE += """
local TERMINAL = {succeeded = true, failed = true, cancelled = true, expired = true}
-- A job that has ended gives back its bytes (the model's count loses them once: the `bytes` field
-- goes with them) and its hold on its request's shared inputs (the last job to end deletes them).
local function settle(job)
  local size, model, inputs = unpack(redis.call('HMGET', job, 'bytes', 'model', 'inputs'))
  if size then
    redis.call('HDEL', job, 'bytes')
    if redis.call('DECRBY', BYTES .. model, size) <= 0 then redis.call('DEL', BYTES .. model) end
  end
  if inputs then
    redis.call('HDEL', job, 'inputs')
    if redis.call('HINCRBY', inputs, 'refs', -1) <= 0 then redis.call('DEL', inputs) end
  end
end
-- Every job that leaves the stream has ended (or is gone): settling it again changes nothing.
local function release(stream, group, entry, job)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  settle(job)
end
-- The shared inputs of a job (field, value, ...), for the worker that claims it.
local function inputs_of(job)
  local key = redis.call('HGET', job, 'inputs')
  if not key then return {} end
  return redis.call('HGETALL', key)
end
local function event(key, ttl, ...)
  redis.call('XADD', key, 'MAXLEN', '~', 1000, '*', ...)
  redis.call('EXPIRE', key, ttl)
end
"""

# All the jobs of one request, or none. KEYS: stream, idempotency key, byte count, shared inputs (or
# ''), then job and events of each job. ARGV: model, owner, now, deadline, max backlog, ttl, idempotency
# ttl, webhook (JSON or ''), its events (",succeeded,failed," or ''), max backlog bytes, k, whether a
# request waits for the answers ('1' or ''), then k (field, image) pairs of the shared inputs, then job
# id and spec of each job.
# An idempotency key that is already there answers the job ids it recorded, and nothing is added; so
# does a first job id that exists already (a retried call).
#
# Bytes: each job counts its spec and its share of the shared inputs (stored once, however many jobs
# read them), in its hash (`bytes`) and in the model's count, until it ends (`settle`). A request that
# would pass the bound is refused, unless nothing is counted: a lone request always fits.
ENQUEUE = """
local k = tonumber(ARGV[11])
local base = 12 + 2 * k
local n = (#ARGV - base) / 2
if KEYS[2] ~= '' then
  local known = redis.call('GET', KEYS[2])
  if known then return {'exists', known} end
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {'exists', ''}
end
local backlog = redis.call('XLEN', KEYS[1])
if backlog + n > tonumber(ARGV[5]) then
  return {'full', tostring(backlog)}
end
local shared = 0
for i = 1, k do shared = shared + #ARGV[12 + 2 * i] end
local sizes, total = {}, 0
for i = 1, n do
  sizes[i] = #ARGV[base + 2 * i] + math.floor(shared / n) + (i == 1 and shared % n or 0)
  total = total + sizes[i]
end
local held = tonumber(redis.call('GET', KEYS[3]) or '0')
if held > 0 and held + total > tonumber(ARGV[10]) then
  return {'full_bytes', tostring(held)}
end
if k > 0 then
  local fields = {}
  for i = 1, 2 * k do fields[i] = ARGV[12 + i] end
  redis.call('HSET', KEYS[4], 'refs', n, unpack(fields))
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
local ids = {}
for i = 1, n do
  local id, spec, job, events = ARGV[base - 1 + 2 * i], ARGV[base + 2 * i], KEYS[3 + 2 * i], KEYS[4 + 2 * i]
  local entry
  if k == 0 and #spec <= INLINE_SPEC then
    entry = redis.call('XADD', KEYS[1], '*', 'job', id, 'spec', spec)
  else
    entry = redis.call('XADD', KEYS[1], '*', 'job', id)
  end
  redis.call('HSET', job, 'id', id, 'model', ARGV[1], 'owner', ARGV[2], 'spec', spec,
    'status', 'queued', 'created', ARGV[3], 'deadline', ARGV[4], 'entry', entry,
    'attempt', 0, 'handed_back', 0, 'results', 0, 'step', 0, 'steps', 0, 'bytes', sizes[i])
  if k > 0 then
    redis.call('HSET', job, 'inputs', KEYS[4])
  end
  if ARGV[8] ~= '' then
    redis.call('HSET', job, 'webhook', ARGV[8], 'webhook_events', ARGV[9])
  end
  if ARGV[12] ~= '' then
    redis.call('HSET', job, 'reply', 1)
  end
  redis.call('EXPIRE', job, ARGV[6])
  event(events, ARGV[6], 'type', 'queued', 'time', ARGV[3])
  table.insert(ids, id)
end
redis.call('INCRBY', KEYS[3], total)
if KEYS[2] ~= '' then
  redis.call('SET', KEYS[2], table.concat(ids, ','), 'EX', ARGV[7])
end
return {'ok', table.concat(ids, ','), tostring(backlog + n)}
"""

# The model's byte count made exact again: the bytes of the jobs in its stream, summed. What settles
# jobs is the protocol's own scripts; jobs ended by an older release's scripts, or whose hash expired
# in the stream, are counted out here (the sweeper runs it). KEYS: stream, byte count.
RECOUNT = """
local total = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'job' then
      local job = JOB .. fields[i + 1]
      local size, status = unpack(redis.call('HMGET', job, 'bytes', 'status'))
      if size and not TERMINAL[status] then total = total + tonumber(size) end
    end
  end
end
if total > 0 then redis.call('SET', KEYS[2], total) else redis.call('DEL', KEYS[2]) end
return total
"""

# KEYS: stream, job, events. ARGV: group, now, ttl.
CANCEL = """
local status, entry = unpack(redis.call('HMGET', KEYS[2], 'status', 'entry'))
if not status then return 'missing' end
if TERMINAL[status] then return status end
redis.call('HSET', KEYS[2], 'status', 'cancelled', 'finished', ARGV[2], 'error', 'cancelled')
redis.call('EXPIRE', KEYS[2], ARGV[3])
event(KEYS[3], ARGV[3], 'type', 'cancelled', 'time', ARGV[2])
notify(KEYS[2], 'cancelled', ARGV[2])
settle(KEYS[2])
-- A queued job leaves the stream now; a running one at its worker's next step boundary.
if status == 'queued' then redis.call('XDEL', KEYS[1], entry) end
return 'ok'
"""

# KEYS: stream, job, events, dead. ARGV: group, entry, worker, max deliveries, now, ttl, job id, model,
# claim token, heartbeat key prefix.
#
# A delivery counts against max deliveries only when the job's last holder may have died of it: it
# does not when that worker's heartbeat is still live (it lost the job to a Redis outage or a slow
# loop, not a crash), and a claim retried after a lost reply (same token) returns the same attempt.
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return {'missing'}
end
local status, attempt, handed, spec, created, deadline, started, holder, token = unpack(redis.call(
  'HMGET', KEYS[2], 'status', 'attempt', 'handed_back', 'spec', 'created', 'deadline', 'started',
  'worker', 'claim'))
if TERMINAL[status] then
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return {'terminal', status}
end
if not spec then
  -- Not a job this protocol wrote (a partial hash): fail it rather than the workers that claim it.
  local reason = 'the job hash has no spec'
  redis.call('HSET', KEYS[2], 'status', 'failed', 'error', reason, 'finished', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  event(KEYS[3], ARGV[6], 'type', 'failed', 'error', reason, 'time', ARGV[5])
  notify(KEYS[2], 'failed', ARGV[5])
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return {'dead', reason}
end
-- Fields a partial hash may lack take their defaults: no attempt yet, no deadline.
attempt = tonumber(attempt) or 0
handed = tonumber(handed) or 0
created = created or ARGV[5]
deadline = deadline or 'inf'
started = started or ''
if token == ARGV[9] and holder == ARGV[3] then  -- this very claim, retried
  return {'claimed', tostring(attempt), tostring(attempt - handed), spec, created, deadline, started,
    unpack(inputs_of(KEYS[2]))}
end
if attempt > 0 and holder and holder ~= ARGV[3] and redis.call('EXISTS', ARGV[10] .. holder) == 1 then
  handed = handed + 1  -- its holder is alive: not a delivery that may have killed a worker
  redis.call('HSET', KEYS[2], 'handed_back', handed)
end
local deliveries = attempt - handed
if deliveries >= tonumber(ARGV[4]) then
  local reason = 'dead-lettered: delivered ' .. deliveries .. ' times without finishing'
  redis.call('HSET', KEYS[2], 'status', 'failed', 'error', reason, 'finished', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'job', ARGV[7], 'model', ARGV[8],
    'reason', reason, 'attempts', attempt, 'time', ARGV[5])
  event(KEYS[3], ARGV[6], 'type', 'failed', 'error', reason, 'time', ARGV[5])
  notify(KEYS[2], 'failed', ARGV[5])
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return {'dead', reason}
end
attempt = attempt + 1
redis.call('HSET', KEYS[2], 'attempt', attempt, 'worker', ARGV[3], 'claim', ARGV[9], 'status', 'queued')
return {'claimed', tostring(attempt), tostring(deliveries + 1), spec, created, deadline, started,
  unpack(inputs_of(KEYS[2]))}
"""

# KEYS: stream, job, events. ARGV: group, entry, attempt, now, ttl.
START = """
local status, attempt = unpack(redis.call('HMGET', KEYS[2], 'status', 'attempt'))
if attempt ~= ARGV[3] then return 'stale' end
if TERMINAL[status] then
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return status
end
redis.call('HSET', KEYS[2], 'status', 'running', 'started', ARGV[4], 'step', 0)
-- A running job outlives its queueing deadline: its hash (and its inputs, which a worker that takes
-- it over reads again) lives at least the result TTL from now.
redis.call('EXPIRE', KEYS[2], ARGV[5], 'GT')
local inputs = redis.call('HGET', KEYS[2], 'inputs')
if inputs then redis.call('EXPIRE', inputs, ARGV[5], 'GT') end
event(KEYS[3], ARGV[5], 'type', 'running', 'attempt', ARGV[3], 'time', ARGV[4])
notify(KEYS[2], 'started', ARGV[4])
return 'running'
"""

# KEYS: stream, job, events. ARGV: group, entry, attempt, step, steps, now, ttl.
PROGRESS = """
local status, attempt = unpack(redis.call('HMGET', KEYS[2], 'status', 'attempt'))
if attempt ~= ARGV[3] then return 'stale' end
if status ~= 'running' then
  if TERMINAL[status] then release(KEYS[1], ARGV[1], ARGV[2], KEYS[2]) end
  return status
end
redis.call('HSET', KEYS[2], 'step', ARGV[4], 'steps', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7], 'GT')
event(KEYS[3], ARGV[7], 'type', 'progress', 'step', ARGV[4], 'steps', ARGV[5], 'attempt', ARGV[3],
  'time', ARGV[6])
return 'running'
"""

# KEYS: stream, job, events, result. ARGV: group, entry, attempt, status, error, now, ttl, png, then
# optionally step and steps: the job's last progress event, published first. In the same script, not
# a PROGRESS call before it: a client blocked on the events (XREAD) is served after each command, so
# it would wake for the progress event alone and need another round trip for the end.
FINISH = """
local status, attempt = unpack(redis.call('HMGET', KEYS[2], 'status', 'attempt'))
if attempt ~= ARGV[3] then return 'stale' end
if TERMINAL[status] then
  release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
  return status
end
if ARGV[9] then
  redis.call('HSET', KEYS[2], 'step', ARGV[9], 'steps', ARGV[10])
  event(KEYS[3], ARGV[7], 'type', 'progress', 'step', ARGV[9], 'steps', ARGV[10], 'attempt', ARGV[3],
    'time', ARGV[6])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[7])
  redis.call('HINCRBY', KEYS[2], 'results', 1)
end
redis.call('HSET', KEYS[2], 'status', ARGV[4], 'finished', ARGV[6], 'error', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
if ARGV[5] ~= '' then
  event(KEYS[3], ARGV[7], 'type', ARGV[4], 'error', ARGV[5], 'time', ARGV[6])
else
  event(KEYS[3], ARGV[7], 'type', ARGV[4], 'time', ARGV[6])
end
notify(KEYS[2], ARGV[4], ARGV[6])
release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
return 'ok'
"""

# KEYS: stream, job, events. ARGV: group, worker, entry, attempt, now, ttl, idle ms.
HAND_BACK = """
local status, attempt = unpack(redis.call('HMGET', KEYS[2], 'status', 'attempt'))
if attempt ~= ARGV[4] then return 'stale' end
if TERMINAL[status] then
  release(KEYS[1], ARGV[1], ARGV[3], KEYS[2])
  return status
end
redis.call('HSET', KEYS[2], 'status', 'queued', 'step', 0)
redis.call('HINCRBY', KEYS[2], 'handed_back', 1)
event(KEYS[3], ARGV[6], 'type', 'queued', 'attempt', ARGV[4], 'time', ARGV[5])
-- Back-date the delivery so that any live worker's XAUTOCLAIM takes it at once.
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[7], 'JUSTID')
return 'ok'
"""

# KEYS: stream 1, job 1, stream 2, job 2, ... ARGV: group, worker, entry 1, attempt 1, entry 2, ...
REFRESH = """
local stale = {}
for i = 1, #KEYS, 2 do
  local j = (i - 1) / 2
  local entry, attempt = ARGV[3 + 2 * j], ARGV[4 + 2 * j]
  if redis.call('HGET', KEYS[i + 1], 'attempt') == attempt then
    -- JUSTID: resets the idle time without counting a delivery.
    redis.call('XCLAIM', KEYS[i], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
  else
    table.insert(stale, entry)
  end
end
return stale
"""

# A preview of a running job (a PNG of its x0 estimate), fenced like progress.
# KEYS: stream, job, events, preview. ARGV: group, entry, attempt, index, step, now, ttl, png.
PREVIEW = """
local status, attempt = unpack(redis.call('HMGET', KEYS[2], 'status', 'attempt'))
if attempt ~= ARGV[3] then return 'stale' end
if status ~= 'running' then return status end
redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[7])
event(KEYS[3], ARGV[7], 'type', 'preview', 'index', ARGV[4], 'step', ARGV[5], 'time', ARGV[6])
return 'ok'
"""

# A queued job past its deadline that no worker started, expired where it waits (no worker needed).
# KEYS: stream, job, events. ARGV: group, entry, now, ttl.
EXPIRE = """
local status, deadline, started = unpack(redis.call('HMGET', KEYS[2], 'status', 'deadline', 'started'))
if status ~= 'queued' or started or not deadline or tonumber(deadline) > tonumber(ARGV[3]) then
  return 'kept'
end
local reason = 'deadline passed before the job started'
redis.call('HSET', KEYS[2], 'status', 'expired', 'finished', ARGV[3], 'error', reason)
redis.call('EXPIRE', KEYS[2], ARGV[4])
event(KEYS[3], ARGV[4], 'type', 'expired', 'error', reason, 'time', ARGV[3])
notify(KEYS[2], 'expired', ARGV[3])
release(KEYS[1], ARGV[1], ARGV[2], KEYS[2])
return 'expired'
"""

SCRIPTS = {
    name: _PRELUDE + body
    for name, body in {
        "enqueue": ENQUEUE.replace("INLINE_SPEC", str(INLINE_SPEC_BYTES)),
        "recount": RECOUNT,
        "cancel": CANCEL,
        "claim": CLAIM,
        "start": START,
        "progress": PROGRESS,
        "finish": FINISH,
        "hand_back": HAND_BACK,
        "refresh": REFRESH,
        "expire": EXPIRE,
        "preview": PREVIEW,
    }.items()
}
