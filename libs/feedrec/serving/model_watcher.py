"""Keep the production version of a registered model loaded, swapping it in without a pause.

Every Serve replica that needs a model (the Retrieval replica's tower + index, the Ingress
replica's vocabularies + Triton model version) and the stack process (which loads new versions
into Triton) holds one :class:`ModelWatcher`. A background thread reads the registry's production
pointer every ``poll_s`` seconds; on a change it builds the new value off the request path and
replaces the old one with one reference assignment, so a request sees the old model or the new
one, never a mix, and never waits. Without a registry the watcher holds a fixed value.

A watcher of the ``shadow`` pointer follows the registry's shadow version instead, and holds
``None`` while there is none (or it is not loadable yet).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, cast

from feedrec.artifacts import ArtifactError
from feedrec.artifacts.model_registry import ModelRegistry, RegistryEntry, RegistryError

logger = logging.getLogger("feedrec.serve")
T = TypeVar("T")
#: Which registry pointer a watcher follows.
Pointer = Literal["production", "shadow"]


class NotReady(RuntimeError):
    """Raised by a build function when a dependency is not there yet (e.g. Triton has not
    loaded the version): the watcher tries again at the next poll, quietly."""


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """What a watcher serves: the value and the registry version it was built from (None for
    a fixed value)."""

    value: T
    version: int | None


class ModelWatcher(Generic[T]):
    """Args: registry + name: the model to follow; build: entry -> value (raises
    ``ArtifactError`` for corrupt files: that version is refused for good and logged;
    ``NotReady``: retried at the next poll; anything else: logged and retried);
    poll_s: seconds between reads of the pointer; pointer: ``production``, or ``shadow``
    (then ``T`` includes ``None``: the value while no shadow version is set or loadable)."""

    def __init__(
        self,
        registry: ModelRegistry | None,
        name: str,
        build: Callable[[RegistryEntry], T],
        *,
        poll_s: float = 2.0,
        initial: Loaded[T] | None = None,
        pointer: Pointer = "production",
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"model watcher: poll_s must be > 0, got {poll_s}")
        self.registry, self.name, self._build, self.poll_s = registry, name, build, poll_s
        self.pointer = pointer
        self.refused: dict[int, str] = {}  # version -> why (corrupt files are not retried)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if initial is not None:
            self._loaded = initial
            return
        if registry is None:
            raise ValueError("model watcher: needs a registry or an initial value")
        if pointer == "shadow":  # loaded by the first poll (a shadow may never be needed)
            self._loaded = Loaded(cast(T, None), None)
            self.poll_once()
            return
        self._loaded = self._first_loadable()

    def _first_loadable(self) -> Loaded[T]:
        """Production, else the versions promoted before it, newest first: a replica that
        starts while production is corrupt, or not yet loaded in Triton, serves what the
        running replicas serve instead of failing to start (and keeps polling)."""
        assert self.registry is not None
        candidates = self.registry.production_history(self.name)
        if not candidates:
            raise RegistryError(f"{self.registry.root}: no {self.name} version in production yet")
        errors = []
        for version in candidates:
            try:
                value = self._build(self.registry.entry(self.name, version))
            except (NotReady, ArtifactError, RegistryError) as e:
                if not isinstance(e, NotReady):
                    self.refused[version] = str(e)
                errors.append(f"v{version}: {e}")
                continue
            if version != candidates[0]:
                self.last_error = f"{self.name}: started on v{version}: " + "; ".join(errors)
                logger.error(self.last_error)
            return Loaded(value, version)
        raise RegistryError(f"{self.name}: no loadable version: " + "; ".join(errors))

    @classmethod
    def fixed(cls, value: T) -> ModelWatcher[T]:
        """A value that never changes (serving a run directory, not a registry)."""
        return cls(None, "", lambda e: value, initial=Loaded(value, None))

    @property
    def current(self) -> T:
        """The value to use for one request (read it once per request)."""
        return self._loaded.value

    @property
    def version(self) -> int | None:
        return self._loaded.version

    def poll_once(self) -> bool:
        """Load the pointer's version if it changed; True when a new value was swapped in."""
        if self.registry is None:
            return False
        try:
            if self.pointer == "shadow":
                version = self.registry.shadow_version(self.name)
            else:
                version = self.registry.production_version(self.name)
        except (OSError, ValueError) as e:  # a pointer being replaced on a network FS, ...
            self.last_error = f"{self.name}: {self.pointer} pointer unreadable: {e!r}"
            return False
        if version is None and self.pointer == "shadow" and self._loaded.version is not None:
            logger.info("%s: shadow v%s cleared", self.name, self._loaded.version)
            self._loaded = Loaded(cast(T, None), None)
            return True
        if version is None or version == self._loaded.version or version in self.refused:
            return False
        try:
            entry = self.registry.entry(self.name, version)
            value = self._build(entry)
        except NotReady:
            return False
        except (ArtifactError, RegistryError) as e:
            # Registered files never change: a bad version stays bad. Keep serving the old one.
            self.refused[version] = str(e)
            self.last_error = f"{self.name} v{version} refused: {e}"
            logger.error("%s; still serving v%s", self.last_error, self._loaded.version)
            return False
        except Exception as e:  # transient (I/O, a server restarting): try again next poll
            self.last_error = f"{self.name} v{version}: {e!r}"
            logger.warning("%s; will retry", self.last_error)
            return False
        previous = self._loaded.version
        self._loaded = Loaded(value, version)
        self.last_error = None
        logger.info("%s %s: v%s -> v%s", self.name, self.pointer, previous, version)
        return True

    def start(self) -> ModelWatcher[T]:
        """Poll in a daemon thread (no-op for a fixed value)."""
        if self.registry is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"watch-{self.name}", daemon=True
            )
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)
            self._thread = None
