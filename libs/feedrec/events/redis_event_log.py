"""The event bus on Redis Streams: the semantics of :class:`~feedrec.events.event_log.EventLog`
(seqs 0, 1, ..., idempotency keys, durable before acknowledged, retention) on a ``redis-server``
that several hosts' writers share.

Keys, for a stream named ``NAME``:

    NAME              the stream; the record with seq n is entry ``0-(n+1)``, its payload one
                      JSON field (``payload``), so ``records(start)`` is an XRANGE from
                      ``0-(start+1)``
    NAME:idempotency  sorted set: idempotency key -> seq of the record that carries it
    NAME:first        the first seq retention kept (absent: 0)
    NAME:snapshot:S   hash {seq, data}: a reader's state S after the records below seq

``append`` is one Lua script, so it is atomic across any number of writer processes: per
record it skips one whose key is in ``NAME:idempotency`` (a duplicate, reported with the earlier
seq) and otherwise XADDs it as ``0-*`` (the stream's next id) and indexes its key. ``retain``
is another: XTRIM MINID plus dropping the trimmed records' keys from the index.

Durability: Redis acknowledges a write once its append-only file has it, and fsyncs that file
before replying only with ``appendonly yes`` and ``appendfsync always``. :class:`RedisEventLog`
checks both at open (CONFIG GET) and refuses a server without them unless it is opened with
``require_fsync=False`` (e.g. a test, or a managed Redis whose CONFIG is disabled but whose
durability is known). With ``appendfsync everysec`` a crash of the machine loses up to a second
of acknowledged events.

Failures: every Redis error (connection refused or lost, timeout, an error reply) is raised as
:class:`EventBusUnavailable`, an :class:`~feedrec.events.event_log.EventLogError`, which the feed
service answers with 503. Commands are never retried here: a retried ``append`` whose first try
did run would write records without an idempotency key twice. The client retries instead (the
keys make that safe). Needs Redis >= 7.0 (``XADD 0-*``, ``XTRIM MINID``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from feedrec.events.event_log import (
    KEY_FIELD,
    MAX_PAYLOAD,
    AppendResult,
    EventLogError,
    LogRecord,
    check_snapshot_name,
    record_received_at,
)
from feedrec.runtime.redis_url import SCHEME, RedisUrl, redact

__all__ = ["SCHEME", "EventBusUnavailable", "RedisEventLog", "RedisLocation", "redact"]

PAYLOAD_FIELD = "payload"
MIN_VERSION = (7, 0)
#: XRANGE page size while reading (a record is one event or one served feed: a few KiB).
PAGE = 512

_APPEND = """
-- KEYS: stream, idempotency index. ARGV: per record a key ('k:' .. key, or '-' for none)
-- then its JSON payload. Returns per record: duplicate (0/1), seq.
local out = {}
for i = 1, #ARGV, 2 do
  local key = nil
  if string.sub(ARGV[i], 1, 2) == 'k:' then key = string.sub(ARGV[i], 3) end
  local earlier = key and redis.call('ZSCORE', KEYS[2], key)
  if earlier then
    out[#out + 1] = 1
    out[#out + 1] = tonumber(earlier)
  else
    local id = redis.call('XADD', KEYS[1], '0-*', 'payload', ARGV[i + 1])
    local seq = tonumber(string.sub(id, 3)) - 1
    if key then redis.call('ZADD', KEYS[2], seq, key) end
    out[#out + 1] = 0
    out[#out + 1] = seq
  end
end
return out
"""

_BOUNDS = """
-- KEYS: stream, first. Returns {first retained seq, end seq}.
local first = tonumber(redis.call('GET', KEYS[2]) or '0')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local stop = first
if #last > 0 then stop = tonumber(string.sub(last[1][1], 3)) end
return {first, stop}
"""

_READ = """
-- KEYS: stream, first. ARGV: start seq, count. Returns {first retained seq, entries}.
local first = tonumber(redis.call('GET', KEYS[2]) or '0')
local from = string.format('0-%d', tonumber(ARGV[1]) + 1)
return {first, redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', ARGV[2])}
"""

_RETAIN = """
-- KEYS: stream, idempotency index, first. ARGV: min seq. Returns records dropped.
local first = tonumber(redis.call('GET', KEYS[3]) or '0')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local stop = first
if #last > 0 then stop = tonumber(string.sub(last[1][1], 3)) end
local min = math.min(tonumber(ARGV[1]), stop)
if min <= first then return 0 end
local dropped = redis.call('XTRIM', KEYS[1], 'MINID', string.format('0-%d', min + 1))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('(%d', min))
redis.call('SET', KEYS[3], string.format('%d', min))
return dropped
"""

_SAVE_SNAPSHOT = """
-- KEYS: snapshot hash. ARGV: seq, data. Keeps the newer of the stored and the given state.
local stored = redis.call('HGET', KEYS[1], 'seq')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2])
return 1
"""


class EventBusUnavailable(EventLogError):
    """Redis could not be reached or refused the command: nothing is acknowledged (503)."""


@dataclass(frozen=True)
class RedisLocation:
    """A parsed ``redis://[user:password@]host[:port][/db]?stream=NAME``."""

    host: str
    port: int
    db: int
    stream: str
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisLocation:
        """Raises ValueError naming the part that is wrong (scheme, host, port, database,
        stream, an unknown parameter)."""
        u = RedisUrl.parse(url, what="event bus", param="stream")
        return cls(u.host, u.port, u.db, u.key, u.username, u.password)

    @property
    def url(self) -> RedisUrl:
        return RedisUrl(self.host, self.port, self.db, self.stream, self.username, self.password)

    def __str__(self) -> str:
        return self.url.show("stream")


def _seq(entry_id: str) -> int:
    ms, _, n = entry_id.partition("-")
    if ms != "0" or not n.isdigit() or int(n) < 1:
        raise EventLogError(f"stream entry {entry_id!r} was not written by RedisEventLog")
    return int(n) - 1


def _body(payload: Mapping[str, Any]) -> str:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    if len(body) > MAX_PAYLOAD:
        raise EventLogError(f"record of {len(body)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return body


class RedisEventLog:
    """The event bus as a Redis stream (see the module docstring). Open it with
    :func:`feedrec.events.event_bus.open_event_bus` or from a :class:`RedisLocation`.

    Args:
        location: server, database and stream name.
        require_fsync: refuse a server without ``appendonly yes`` + ``appendfsync always``.
        timeout_s: socket connect and command timeout.

    Example::

        log = RedisEventLog(RedisLocation.parse("redis://127.0.0.1:6379/0?stream=events"))
        log.append([{"idempotency_key": "a", "x": 1}]).seqs  # (0,)
    """

    def __init__(
        self, location: RedisLocation, *, require_fsync: bool = True, timeout_s: float = 5.0
    ) -> None:
        self.location = location
        self._client = location.url.client(
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # never re-run a command (see the module docstring)
        )
        stream = location.stream
        self._stream, self._index, self._first = stream, f"{stream}:idempotency", f"{stream}:first"
        self._append = self._client.register_script(_APPEND)
        self._bounds = self._client.register_script(_BOUNDS)
        self._read = self._client.register_script(_READ)
        self._retain = self._client.register_script(_RETAIN)
        # Snapshots are bytes: a client that does not decode replies.
        self._bytes_client = location.url.client(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._save_snapshot = self._bytes_client.register_script(_SAVE_SNAPSHOT)
        with self._errors("open"):
            self._check_server(require_fsync)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """A Redis error inside becomes :class:`EventBusUnavailable` naming the bus."""
        try:
            yield
        except redis.RedisError as e:
            raise EventBusUnavailable(
                f"event bus {self.location}: {what}: {type(e).__name__}: {e}"
            ) from e

    def _check_server(self, require_fsync: bool) -> None:
        info = cast(dict[str, Any], self._client.info("server"))
        version = str(info.get("redis_version", "0"))
        if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
            raise EventLogError(
                f"event bus {self.location}: redis-server {version} is too old, needs >= "
                f"{'.'.join(map(str, MIN_VERSION))}"
            )
        if not require_fsync:
            return
        try:
            config = cast(dict[str, str], self._client.config_get("append*"))
        except redis.ResponseError as e:
            raise EventLogError(
                f"event bus {self.location}: cannot check durability (CONFIG GET: {e}); open "
                "with require_fsync=False only if the server is known to run appendonly yes "
                "and appendfsync always"
            ) from e
        found = {k: config.get(k) for k in ("appendonly", "appendfsync")}
        if found != {"appendonly": "yes", "appendfsync": "always"}:
            raise EventLogError(
                f"event bus {self.location}: acknowledged events would not be durable: the "
                f"server runs appendonly {found['appendonly']}, appendfsync "
                f"{found['appendfsync']}; start redis-server with --appendonly yes "
                "--appendfsync always (or open with require_fsync=False to accept the loss)"
            )

    def close(self) -> None:
        """Release this writer's connections (the bus itself is unaffected)."""
        self._client.close()
        self._bytes_client.close()

    # -- reading -----------------------------------------------------------------------------

    def records(self, start_seq: int = 0) -> Iterator[LogRecord]:
        """Every record with ``seq >= start_seq``, in order. Raises EventLogError if
        ``start_seq`` was already dropped by :meth:`retain` (also if that happens while
        reading)."""
        seq = start_seq
        while True:
            with self._errors("read"):
                first, entries = self._read(keys=[self._stream, self._first], args=[seq, PAGE])
            if seq < int(first):
                raise EventLogError(
                    f"records before seq {first} were dropped by retention; asked for seq {seq}"
                )
            for entry_id, fields in entries:
                if _seq(entry_id) != seq:
                    raise EventLogError(
                        f"stream {self._stream}: expected seq {seq}, found entry {entry_id}"
                    )
                values = dict(zip(fields[::2], fields[1::2], strict=True))
                if PAYLOAD_FIELD not in values:
                    raise EventLogError(f"stream entry {entry_id} has no {PAYLOAD_FIELD} field")
                yield LogRecord(seq, json.loads(values[PAYLOAD_FIELD]))
                seq += 1
            if len(entries) < PAGE:
                return

    def seq_at(self, unix_s: float) -> int:
        """A seq from which every record received (``received_at``) at or after ``unix_s``
        is read: a binary search over the stream (one single-entry XRANGE a step) for the
        first record received at or after it; a record without ``received_at`` counts as new.
        Records are appended about in ``received_at`` order (each writer stamps the time just
        before it appends), so a record a few ms older may follow."""
        with self._errors("read"):
            lo, hi = (int(b) for b in self._bounds(keys=[self._stream, self._first]))
            while lo < hi:
                mid = (lo + hi) // 2
                entries = cast(
                    list[tuple[str, dict[str, str]]],
                    self._client.xrange(self._stream, min=f"0-{mid + 1}", count=1),
                )
                if not entries:  # the stream was deleted meanwhile
                    break
                received = record_received_at(entries[0][1].get(PAYLOAD_FIELD, "{}"))
                if received is not None and received < unix_s:
                    lo = mid + 1
                else:
                    hi = mid
        return lo

    def end_seq(self) -> int:
        """The seq the next appended record gets."""
        with self._errors("read"):
            _, stop = self._bounds(keys=[self._stream, self._first])
        return int(stop)

    # -- writing -----------------------------------------------------------------------------

    def append(self, payloads: Sequence[Mapping[str, Any]]) -> AppendResult:
        """Write the records not already on the bus (by ``KEY_FIELD``), atomically; returns
        once Redis acknowledged them (durable with ``appendfsync always``). Raises
        EventLogError (nothing written) for an unencodable record, EventBusUnavailable when
        Redis fails (then maybe written: re-send, the keys dedupe)."""
        if not payloads:
            return AppendResult((), ())
        args: list[str] = []
        for payload in payloads:
            key = payload.get(KEY_FIELD)
            args += ["k:" + key if isinstance(key, str) else "-", _body(payload)]
        with self._errors("append"):
            out = self._append(keys=[self._stream, self._index], args=args)
        return AppendResult(
            seqs=tuple(int(s) for s in out[1::2]), duplicates=tuple(bool(d) for d in out[::2])
        )

    # -- snapshots ---------------------------------------------------------------------------

    def _snapshot_key(self, name: str) -> str:
        return f"{self._stream}:snapshot:{check_snapshot_name(name)}"

    def save_snapshot(self, name: str, seq: int, data: bytes) -> None:
        """Store ``data``, a reader's state after every record below ``seq``, as ``name``,
        unless a newer one is stored already (one script: atomic)."""
        with self._errors("save snapshot"):
            self._save_snapshot(keys=[self._snapshot_key(name)], args=[seq, data])

    def snapshot_seq(self, name: str) -> int | None:
        """The seq of the snapshot called ``name`` (None: there is none)."""
        with self._errors("read snapshot"):
            seq = self._client.hget(self._snapshot_key(name), "seq")
        return None if seq is None else int(cast(str, seq))

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """The snapshot called ``name``: (seq, data), or None."""
        with self._errors("read snapshot"):
            seq, data = cast(
                list[bytes | None],
                self._bytes_client.hmget(self._snapshot_key(name), ["seq", "data"]),
            )
        return None if seq is None or data is None else (int(seq), data)

    def retain(self, min_seq: int) -> int:
        """Drop the records with ``seq < min_seq`` (at most up to the end) and their keys from
        the idempotency window; returns how many records were dropped."""
        with self._errors("retain"):
            dropped = self._retain(keys=[self._stream, self._index, self._first], args=[min_seq])
        return int(dropped)
