"""A ``redis://[user:password@]host[:port][/db]?NAME=KEY`` location, parsed once for every
feedrec component that lives on a Redis server (the event bus's stream, the online feature
store's key prefix). Errors name the bad part and never show a password."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import redis

SCHEME = "redis"
DEFAULT_PORT = 6379
#: A key name: a Redis key (``{...}`` hash tags allowed, for Redis Cluster slots).
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:{}/-]{1,200}$")


def redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


@dataclass(frozen=True)
class RedisUrl:
    """Server, database, credentials and the one key parameter (``key``) of a location."""

    host: str
    port: int
    db: int
    key: str
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, *, what: str, param: str, default: str | None = None) -> RedisUrl:
        """Parse ``url`` whose key is the query parameter ``param`` (required unless
        ``default``). Raises ValueError starting with ``what`` and naming the part that is
        wrong (scheme, host, port, database, the key, an unknown parameter)."""
        shown = redact(url)
        parts = urlsplit(url)
        usage = f"redis://host:port/db?{param}=NAME"
        if parts.scheme != SCHEME:
            raise ValueError(f"{what} {shown}: scheme must be {SCHEME}://, got {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError(f"{what} {shown}: no host ({usage})")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{what} {shown}: port must be an integer 1-65535") from None
        path = parts.path.strip("/")
        if not (path == "" or (path.isdigit() and path.isascii())):
            raise ValueError(f"{what} {shown}: database must be an integer, got {path!r}")
        if parts.fragment:
            raise ValueError(f"{what} {shown}: unexpected fragment #{parts.fragment}")
        params = parse_qsl(parts.query, keep_blank_values=True)
        unknown = sorted({k for k, _ in params} - {param})
        if unknown:
            raise ValueError(f"{what} {shown}: unknown parameter(s) {', '.join(unknown)}")
        keys = [v for k, v in params if k == param] or ([default] if default is not None else [])
        if len(keys) != 1:
            many = "at most" if default is not None else "exactly"
            raise ValueError(f"{what} {shown}: needs {many} one ?{param}=NAME")
        if not KEY_PATTERN.match(keys[0]):
            raise ValueError(
                f"{what} {shown}: {param} must match {KEY_PATTERN.pattern}, got {keys[0]!r}"
            )
        return cls(
            host=parts.hostname,
            port=port,
            db=int(path or 0),
            key=keys[0],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def client(self, **options: object) -> redis.Redis:
        """A client of this server and database (``options``: more ``redis.Redis`` keywords)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            **options,  # type: ignore[arg-type]
        )

    def show(self, param: str) -> str:
        """The location as a URL, password hidden."""
        auth = "***@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{self.db}?{param}={self.key}"
