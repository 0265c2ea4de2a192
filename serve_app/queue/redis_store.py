"""The cluster job store: Redis, shared by every router replica on every node.

A job is a hash; the queue is one sorted set per priority, scored by a submit sequence, so a
position is a `ZRANK`. Leases, start deadlines and finish times are sorted sets scored by time.
Every change that touches more than one key is a Lua script, so it is atomic however many
routers claim at once. With Redis's append-only file on, a restart loses no accepted job.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis

from serve_app.queue.store import (
    CANCELLED,
    PRIORITY_RANK,
    AdmissionLimits,
    CancelResult,
    JobRecord,
    JobState,
    NewJob,
    Outcome,
    QueueFull,
    new_gateway_id,
    now,
)

# How many queued jobs a claim looks past when the first ones' keys are at their running limit.
CLAIM_WINDOW = 256

# KEYS: prefix-relative names are built in Lua from ARGV[1] (the prefix), so one script serves
# every namespace. (A Redis Cluster would need hash tags; a single primary with replicas does not.)
_COMPLETE = """
local function complete(p, id, status_code, body, metrics, finished_at)
  local job = p .. 'job:' .. id
  local state = redis.call('HGET', job, 'state')
  local key_id = redis.call('HGET', job, 'key_id')
  if state == 'IN_QUEUE' then
    redis.call('ZREM', p .. 'queue:' .. redis.call('HGET', job, 'priority'), id)
    redis.call('ZREM', p .. 'deadlines', id)
    redis.call('HINCRBY', p .. 'queued_by_key', key_id, -1)
    redis.call('HINCRBY', p .. 'queued_by_app', redis.call('HGET', job, 'app'), -1)
  elseif state == 'IN_PROGRESS' then
    redis.call('ZREM', p .. 'leases', id)
    redis.call('HINCRBY', p .. 'running_by_key', key_id, -1)
  end
  redis.call('HSET', job, 'state', 'COMPLETED', 'status_code', status_code, 'result', body, 'metrics', metrics,
             'finished_at', finished_at, 'payload', '', 'lease_owner', '', 'lease_until', '')
  redis.call('ZADD', p .. 'done', finished_at, id)
  local webhook_url = redis.call('HGET', job, 'webhook_url')
  if webhook_url and webhook_url ~= '' and not redis.call('HGET', job, 'webhook_state') then
    -- its delivery, due now, in the same step: no completion goes unannounced
    redis.call('HSET', job, 'webhook_state', 'pending', 'webhook_attempts', 0)
    redis.call('ZADD', p .. 'webhooks', finished_at, id)
  end
end
"""

# A token bucket on the server's clock (one clock for every router): KEYS[1] the bucket,
# ARGV capacity, refill per second. Returns the wait as a string (Lua numbers would truncate).
_TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = capacity
if state[1] then
  tokens = math.min(capacity, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 60000)
return tostring(wait)
"""

# Sync calls in flight, per holder (router replica): a hash per holder, key id -> count, and a
# sorted set of holders by expiry (the server's clock). Expired holders are dropped first.
_ENTER_SYNC_RUN = """
local p, key_id, holder, limit, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local holders = p .. 'sync_holders'
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', holders, '-inf', now)) do
  redis.call('DEL', p .. 'sync:' .. dead)
  redis.call('ZREM', holders, dead)
end
local total = tonumber(redis.call('HGET', p .. 'running_by_key', key_id) or '0')
for _, live in ipairs(redis.call('ZRANGE', holders, 0, -1)) do
  total = total + tonumber(redis.call('HGET', p .. 'sync:' .. live, key_id) or '0')
end
if total >= limit then return 0 end
redis.call('HINCRBY', p .. 'sync:' .. holder, key_id, 1)
redis.call('ZADD', holders, now + ttl, holder)
return 1
"""

_LEAVE_SYNC_RUN = """
local p, key_id, holder = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HINCRBY', p .. 'sync:' .. holder, key_id, -1) <= 0 then
  redis.call('HDEL', p .. 'sync:' .. holder, key_id)
end
"""

_RENEW_SYNC_RUNS = """
local p, holder, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
redis.call('DEL', p .. 'sync:' .. holder)
for i = 4, #ARGV, 2 do
  redis.call('HSET', p .. 'sync:' .. holder, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', p .. 'sync_holders', tonumber(t[1]) + tonumber(t[2]) / 1000000 + ttl, holder)
"""

_SUBMIT = """
local p, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_queued, max_per_key = tonumber(ARGV[4]), tonumber(ARGV[5])
local app, key_id, priority, deadline = ARGV[7], ARGV[9], ARGV[10], ARGV[14]
if max_queued and max_queued >= 0 then
  local queued = redis.call('ZCARD', p .. 'queue:0') + redis.call('ZCARD', p .. 'queue:1')
  if queued >= max_queued then return 'full:' .. queued end
end
if max_per_key and max_per_key >= 0 then
  local mine = tonumber(redis.call('HGET', p .. 'queued_by_key', key_id) or '0')
  if mine >= max_per_key then return 'key:' .. mine end
end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'job:' .. id, 'request_id', id, 'seq', seq, 'endpoint', ARGV[6], 'app', app, 'payload', ARGV[8],
           'key_id', key_id, 'priority', priority, 'webhook_url', ARGV[11], 'no_retry', ARGV[12], 'runner_hint', ARGV[13],
           'start_deadline', deadline, 'base_url', ARGV[15], 'state', 'IN_QUEUE', 'gateway_request_id', id, 'attempts', 0, 'created_at', now,
           'cancel_requested', 0, 'metrics', '{}')
redis.call('ZADD', p .. 'queue:' .. priority, seq, id)
redis.call('HINCRBY', p .. 'queued_by_key', key_id, 1)
redis.call('HINCRBY', p .. 'queued_by_app', app, 1)
if deadline ~= '' then redis.call('ZADD', p .. 'deadlines', tonumber(deadline), id) end
return 'ok'
"""

_CLAIM = """
local p, worker, now, lease_s, window = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_running = tonumber(ARGV[6])
local apps = {}
local filter = #ARGV > 6
for i = 7, #ARGV do apps[ARGV[i]] = true end
local live = {}  -- routers whose sync calls count against the key's running limit
if max_running and max_running >= 0 then
  local t = redis.call('TIME')
  live = redis.call('ZRANGEBYSCORE', p .. 'sync_holders', '(' .. (tonumber(t[1]) + tonumber(t[2]) / 1000000), '+inf')
end
for priority = 0, 1 do
  local queue = p .. 'queue:' .. priority
  for _, id in ipairs(redis.call('ZRANGE', queue, 0, window - 1)) do
    local job = p .. 'job:' .. id
    local fields = redis.call('HMGET', job, 'app', 'key_id')
    local app, key_id = fields[1], fields[2]
    local allowed = (not filter) or apps[app]
    if allowed and max_running and max_running >= 0 then
      local running = tonumber(redis.call('HGET', p .. 'running_by_key', key_id) or '0')
      for _, holder in ipairs(live) do
        running = running + tonumber(redis.call('HGET', p .. 'sync:' .. holder, key_id) or '0')
      end
      allowed = running < max_running
    end
    if allowed then
      redis.call('ZREM', queue, id)
      redis.call('ZREM', p .. 'deadlines', id)
      redis.call('HSET', job, 'state', 'IN_PROGRESS', 'lease_owner', worker, 'lease_until', now + lease_s, 'started_at', now)
      redis.call('HINCRBY', job, 'attempts', 1)
      redis.call('ZADD', p .. 'leases', now + lease_s, id)
      redis.call('HINCRBY', p .. 'queued_by_key', key_id, -1)
      redis.call('HINCRBY', p .. 'queued_by_app', app, -1)
      redis.call('HINCRBY', p .. 'running_by_key', key_id, 1)
      return id
    end
  end
end
return false
"""

_RENEW = """
local p, id, worker, lease_until = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local job = p .. 'job:' .. id
local fields = redis.call('HMGET', job, 'state', 'lease_owner')
if fields[1] ~= 'IN_PROGRESS' or fields[2] ~= worker then return 0 end
redis.call('HSET', job, 'lease_until', lease_until)
redis.call('ZADD', p .. 'leases', lease_until, id)
return 1
"""

_FINISH = _COMPLETE + """
local p, id, worker = ARGV[1], ARGV[2], ARGV[3]
local fields = redis.call('HMGET', p .. 'job:' .. id, 'state', 'lease_owner')
local state, owner = fields[1], fields[2]
if not state or state == 'COMPLETED' then return 0 end
if worker ~= '' and (state ~= 'IN_PROGRESS' or owner ~= worker) then return 0 end
complete(p, id, ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
return 1
"""

_CANCEL = _COMPLETE + """
local p, id, app = ARGV[1], ARGV[2], ARGV[3]
local fields = redis.call('HMGET', p .. 'job:' .. id, 'state', 'app')
local state = fields[1]
if not state or (app ~= '' and fields[2] ~= app) then return 'not_found' end
if state == 'COMPLETED' then return 'already_completed' end
if state == 'IN_PROGRESS' then
  redis.call('HSET', p .. 'job:' .. id, 'cancel_requested', 1)
  return 'requested'
end
complete(p, id, ARGV[4], ARGV[5], '{}', tonumber(ARGV[6]))
return 'cancelled'
"""

_REQUEUE = """
-- With a worker: that lease holder gives the job back. Without: the job's lease has run out.
local p, id, now, gateway, worker, max_attempts = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local job = p .. 'job:' .. id
local fields = redis.call('HMGET', job, 'state', 'lease_until', 'no_retry', 'priority', 'seq', 'key_id', 'app', 'lease_owner', 'attempts')
if fields[1] ~= 'IN_PROGRESS' then return 0 end
if worker ~= '' then
  if fields[8] ~= worker then return 0 end
elseif fields[2] == '' or tonumber(fields[2]) >= now then
  return 0
end
redis.call('ZREM', p .. 'leases', id)
if worker == '' and (fields[3] == '1' or (max_attempts >= 0 and tonumber(fields[9]) >= max_attempts)) then
  -- Its worker is gone and it must not run again: the caller completes it.
  redis.call('HSET', job, 'lease_owner', '', 'lease_until', '')
  return 2
end
-- Back to the head of its priority: its sequence number is older than anything still queued.
redis.call('HSET', job, 'state', 'IN_QUEUE', 'lease_owner', '', 'lease_until', '', 'started_at', '', 'gateway_request_id', gateway)
redis.call('ZADD', p .. 'queue:' .. fields[4], tonumber(fields[5]), id)
redis.call('HINCRBY', p .. 'running_by_key', fields[6], -1)
redis.call('HINCRBY', p .. 'queued_by_key', fields[6], 1)
redis.call('HINCRBY', p .. 'queued_by_app', fields[7], 1)
return 1
"""

_PURGE = """
local p, cutoff = ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', p .. 'done', '-inf', '(' .. cutoff)
local purged = 0
for _, id in ipairs(ids) do
  -- a job whose webhook is still being delivered is kept: the delivery reads its result
  if redis.call('HGET', p .. 'job:' .. id, 'webhook_state') ~= 'pending' then
    redis.call('DEL', p .. 'job:' .. id, p .. 'logs:' .. id)
    redis.call('ZREM', p .. 'done', id)
    purged = purged + 1
  end
end
return purged
"""

_CLAIM_WEBHOOK = """
-- The due set is scored by when a delivery may next be tried: claiming it pushes that to the end
-- of the lease, so a deliverer that dies leaves it due again then.
local p, worker, now, lease_s = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', p .. 'webhooks', '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
local id = due[1]
redis.call('ZADD', p .. 'webhooks', now + lease_s, id)
redis.call('HSET', p .. 'job:' .. id, 'webhook_owner', worker)
redis.call('HINCRBY', p .. 'job:' .. id, 'webhook_attempts', 1)
return id
"""

_WEBHOOK_ATTEMPTED = """
local p, id, worker, state, error, retry_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local job = p .. 'job:' .. id
local fields = redis.call('HMGET', job, 'webhook_state', 'webhook_owner')
if fields[1] ~= 'pending' or fields[2] ~= worker then return 0 end
redis.call('HSET', job, 'webhook_state', state, 'webhook_owner', '', 'webhook_error', error)
if state == 'pending' then
  redis.call('ZADD', p .. 'webhooks', tonumber(retry_at), id)
else
  redis.call('ZREM', p .. 'webhooks', id)
end
return 1
"""


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _record(fields: dict[str, str | bytes], logs: list[bytes]) -> JobRecord:
    text = {k: (v.decode() if isinstance(v, bytes) and k not in ("payload", "result") else v) for k, v in fields.items()}
    result = fields.get("result")
    return JobRecord(
        request_id=text["request_id"],
        app=text["app"],
        endpoint=text["endpoint"],
        payload=bytes(fields.get("payload") or b""),
        key_id=text["key_id"],
        base_url=text.get("base_url") or "",
        priority="normal" if text["priority"] == "0" else "low",
        webhook_url=text.get("webhook_url") or None,
        no_retry=text.get("no_retry") == "1",
        start_deadline=_float(text.get("start_deadline")),
        runner_hint=text.get("runner_hint") or None,
        state=JobState(text["state"]),
        gateway_request_id=text["gateway_request_id"],
        attempts=int(text.get("attempts") or 0),
        created_at=float(text["created_at"]),
        started_at=_float(text.get("started_at")),
        finished_at=_float(text.get("finished_at")),
        lease_owner=text.get("lease_owner") or None,
        lease_until=_float(text.get("lease_until")),
        cancel_requested=text.get("cancel_requested") == "1",
        status_code=int(text["status_code"]) if text.get("status_code") else None,
        result=bytes(result) if result is not None and text["state"] == "COMPLETED" else None,
        metrics=json.loads(text.get("metrics") or "{}"),
        logs=[json.loads(entry) for entry in logs],
        webhook_state=text.get("webhook_state") or None,  # type: ignore[arg-type]
        webhook_attempts=int(text.get("webhook_attempts") or 0),
        webhook_error=text.get("webhook_error") or None,
    )


# Every field of a job's hash but the bodies (payload, result): what a status poll reads.
_LIGHT_FIELDS = (
    "request_id", "app", "endpoint", "key_id", "base_url", "priority", "webhook_url", "no_retry", "start_deadline",
    "runner_hint", "state", "gateway_request_id", "attempts", "created_at", "started_at", "finished_at", "lease_owner",
    "lease_until", "cancel_requested", "status_code", "metrics", "webhook_state", "webhook_attempts", "webhook_error",
)


class RedisJobStore:
    def __init__(self, url: str, prefix: str = "diffusion-serve:", password: str | None = None) -> None:
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, **({"password": password} if password else {}))
        self._scripts = {
            name: self.redis.register_script(source)
            for name, source in {
                "submit": _SUBMIT, "claim": _CLAIM, "renew": _RENEW, "finish": _FINISH,
                "cancel": _CANCEL, "requeue": _REQUEUE, "purge": _PURGE,
                "claim_webhook": _CLAIM_WEBHOOK, "webhook_attempted": _WEBHOOK_ATTEMPTED, "take_token": _TAKE_TOKEN,
                "enter_sync_run": _ENTER_SYNC_RUN, "leave_sync_run": _LEAVE_SYNC_RUN, "renew_sync_runs": _RENEW_SYNC_RUNS,
            }.items()
        }

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(self, job: NewJob, limits: AdmissionLimits = AdmissionLimits()) -> JobRecord:
        created = now()
        deadline = created + job.start_timeout_s if job.start_timeout_s else ""
        outcome = await self._scripts["submit"](
            args=[
                self.prefix, job.request_id, created,
                limits.max_queued if limits.max_queued is not None else -1,
                limits.max_queued_per_key if limits.max_queued_per_key is not None else -1,
                job.endpoint, job.app, job.payload, job.key_id, PRIORITY_RANK[job.priority], job.webhook_url or "",
                int(job.no_retry), job.runner_hint or "", deadline, job.base_url,
            ]
        )
        outcome = outcome.decode()
        if outcome.startswith("full:"):
            raise QueueFull(f"the queue is full ({outcome[5:]} jobs waiting)")
        if outcome.startswith("key:"):
            raise QueueFull(f"this key already has {outcome[4:]} jobs waiting (at most {limits.max_queued_per_key})")
        record = await self.get(job.request_id)
        assert record is not None
        return record

    async def get(self, request_id: str, app: str | None = None, bodies: bool = True, logs: bool = True) -> JobRecord | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            if bodies:
                pipe.hgetall(self._key("job", request_id))
            else:
                pipe.hmget(self._key("job", request_id), _LIGHT_FIELDS)
            if logs:
                pipe.lrange(self._key("logs", request_id), 0, -1)
            replies = await pipe.execute()
        if bodies:
            fields = {k.decode(): v for k, v in replies[0].items()}
        else:
            fields = {name: value for name, value in zip(_LIGHT_FIELDS, replies[0]) if value is not None}
        if not fields:
            return None
        record = _record(fields, replies[1] if logs else [])
        return record if app is None or record.app == app else None

    async def position(self, request_id: str) -> int | None:
        state, priority = await self.redis.hmget(self._key("job", request_id), "state", "priority")
        if state != b"IN_QUEUE":
            return None
        rank = await self.redis.zrank(self._key("queue", priority.decode()), request_id)
        if rank is None:
            return None
        return rank + (await self.redis.zcard(self._key("queue", "0")) if priority == b"1" else 0)

    async def claim(self, worker: str, lease_s: float, apps: set[str] | None = None, max_running_per_key: int | None = None) -> JobRecord | None:
        if apps is not None and not apps:
            return None
        args = [self.prefix, worker, now(), lease_s, CLAIM_WINDOW, max_running_per_key if max_running_per_key is not None else -1]
        request_id = await self._scripts["claim"](args=[*args, *sorted(apps or ())])
        return await self.get(request_id.decode()) if request_id else None

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        return bool(await self._scripts["renew"](args=[self.prefix, request_id, worker, now() + lease_s]))

    async def append_log(self, request_id: str, entry: dict[str, Any]) -> None:
        await self.redis.rpush(self._key("logs", request_id), json.dumps(entry))

    async def finish(self, request_id: str, worker: str | None, outcome: Outcome) -> bool:
        args = [self.prefix, request_id, worker or "", outcome.status_code, outcome.body, json.dumps(outcome.metrics), now()]
        return bool(await self._scripts["finish"](args=args))

    async def cancel(self, request_id: str, app: str | None = None) -> CancelResult:
        args = [self.prefix, request_id, app or "", CANCELLED.status_code, CANCELLED.body, now()]
        return (await self._scripts["cancel"](args=args)).decode()  # type: ignore[return-value]

    async def cancel_requested(self, request_id: str) -> bool:
        return await self.redis.hget(self._key("job", request_id), "cancel_requested") == b"1"

    async def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[str], list[JobRecord]]:
        moment = now()
        expired = await self.redis.zrangebyscore(self._key("leases"), "-inf", f"({moment}")
        requeued, handed_back = [], []
        for raw in expired:
            request_id = raw.decode()
            args = [self.prefix, request_id, moment, new_gateway_id(), "", max_attempts if max_attempts is not None else -1]
            outcome = await self._scripts["requeue"](args=args)  # 1: requeued, 2: handed back
            if outcome == 1:
                requeued.append(request_id)
            elif outcome == 2 and (record := await self.get(request_id)) is not None:
                handed_back.append(record)
        return requeued, handed_back

    async def release(self, request_id: str, worker: str) -> bool:
        return bool(await self._scripts["requeue"](args=[self.prefix, request_id, now(), new_gateway_id(), worker, -1]))

    async def expired_unstarted(self) -> list[JobRecord]:
        ids = await self.redis.zrangebyscore(self._key("deadlines"), "-inf", f"({now()}")
        records = [await self.get(raw.decode()) for raw in ids]
        return [r for r in records if r is not None and r.state is JobState.IN_QUEUE]

    async def purge(self, older_than_s: float) -> int:
        return int(await self._scripts["purge"](args=[self.prefix, now() - older_than_s]))

    async def depth(self, app: str | None = None) -> int:
        if app is None:
            return await self.redis.zcard(self._key("queue", "0")) + await self.redis.zcard(self._key("queue", "1"))
        return int(await self.redis.hget(self._key("queued_by_app"), app) or 0)

    async def running(self, key_id: str | None = None) -> int:
        if key_id is not None:
            return int(await self.redis.hget(self._key("running_by_key"), key_id) or 0)
        return sum(int(v) for v in await self.redis.hvals(self._key("running_by_key")))

    async def claim_webhook(self, worker: str, lease_s: float) -> JobRecord | None:
        request_id = await self._scripts["claim_webhook"](args=[self.prefix, worker, now(), lease_s])
        return await self.get(request_id.decode()) if request_id else None

    async def webhook_attempted(self, request_id: str, worker: str, delivered: bool, error: str | None, retry_at: float | None) -> bool:
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        args = [self.prefix, request_id, worker, state, error or "", retry_at if retry_at is not None else ""]
        return bool(await self._scripts["webhook_attempted"](args=args))

    async def enter_sync_run(self, key_id: str, holder: str, limit: int, ttl_s: float) -> bool:
        return bool(await self._scripts["enter_sync_run"](args=[self.prefix, key_id, holder, limit, ttl_s]))

    async def leave_sync_run(self, key_id: str, holder: str) -> None:
        await self._scripts["leave_sync_run"](args=[self.prefix, key_id, holder])

    async def renew_sync_runs(self, holder: str, counts: dict[str, int], ttl_s: float) -> None:
        pairs = [item for key_id, n in counts.items() if n > 0 for item in (key_id, n)]
        await self._scripts["renew_sync_runs"](args=[self.prefix, holder, ttl_s, *pairs])

    async def take_token(self, bucket: str, capacity: float, refill_per_s: float) -> float:
        return float(await self._scripts["take_token"](keys=[self._key("bucket", bucket)], args=[capacity, refill_per_s]))

    async def shared_value(self, name: str, make: bytes) -> bytes:
        key = self._key("shared", name)
        await self.redis.set(key, make, nx=True)
        return bytes(await self.redis.get(key))
