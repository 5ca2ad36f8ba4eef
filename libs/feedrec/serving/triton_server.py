"""Run NVIDIA Triton Inference Server as a plain child process (no Docker).

The ``nvidia-pytriton`` wheel ships a complete ``tritonserver`` binary, the python backend
(``libtriton_python.so``) and one ``triton_python_backend_stub`` per CPython minor version.
:class:`TritonServer` assembles those pieces into a backend directory, builds the environment
the stub needs and supervises the process.

Environment details that are easy to get wrong (all measured, see ``shared/notes/stack.md``):

* The stub links ``libpython3.X.so.1.0``. The system copy may differ from the interpreter that
  runs this code, and then model initialisation dies in odd ways
  (``'_thread.RLock' object has no attribute '_recursion_count'``), so the running interpreter's
  ``LIBDIR`` goes first on ``LD_LIBRARY_PATH``.
* The stub embeds an *isolated* interpreter (``sys.flags.isolated == 1``): ``PYTHONPATH`` and
  other ``PYTHON*`` variables are ignored. Its ``sys.executable`` is ``python3`` looked up on
  ``PATH``, and from there CPython finds ``pyvenv.cfg``: with the venv's bin first on ``PATH``
  the stub gets the venv's site-packages (torch, torchrec, numpy) and its ``.pth`` files (the
  editable ``feedrec`` install). Without that: ``No module named 'torch'``.
* Extra import dirs (``libs/`` for a non-installed checkout, test modules) therefore travel in
  ``FEEDREC_TRITON_PYTHONPATH``, which ``apps/triton/ranker/model.py`` prepends to ``sys.path``.
* Ports are always explicit and bound to 127.0.0.1; Triton's defaults (8000-8002) collide with
  Ray Serve's HTTP proxy on 8000.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40
STUB_PYTHONPATH_ENV = "FEEDREC_TRITON_PYTHONPATH"
_MAX_PORT = 65535


@dataclass(frozen=True)
class TritonServerConfig:
    """How to launch one ``tritonserver`` process.

    Attributes:
        model_repository: Directory holding ``<model>/config.pbtxt`` + ``<model>/<version>/``.
        http_port, grpc_port, metrics_port: TCP ports; 0 means "pick a free port at start()".
        host: Address every endpoint binds to. Loopback by default: the server is only reached
            by co-located Ray Serve replicas, never from outside the machine.
        log_path: File receiving the server's stdout+stderr; None -> a file in a temp dir that
            is removed on stop().
        ready_timeout_s: How long wait_ready() polls ``/v2/health/ready`` before giving up.
        exit_timeout_s: Passed as ``--exit-timeout-secs`` (how long Triton drains in-flight
            requests on SIGTERM); stop() escalates to SIGKILL a few seconds after it.
        extra_args: Extra command-line flags appended verbatim.
        extra_env: Extra environment variables (name, value) for the server and its stubs
            (applied last).
        python_path: Extra import dirs for models that honour ``FEEDREC_TRITON_PYTHONPATH``
            (the ranker template does), e.g. a test's fake predictor module. The repository's
            ``libs/`` dir is always appended.
    """

    model_repository: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    ready_timeout_s: float = 120.0
    exit_timeout_s: int = 10
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    python_path: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        # Coerce str paths so callers can pass either; object.__setattr__ because frozen.
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        if self.log_path is not None:
            object.__setattr__(self, "log_path", Path(self.log_path))
        if not self.model_repository.is_dir():
            raise ValueError(f"model_repository {self.model_repository} is not a directory")
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port}
        ports["metrics_port"] = self.metrics_port
        for name, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
                raise ValueError(f"{name} must be an int in [0, {_MAX_PORT}], got {port!r}")
        fixed = [p for p in ports.values() if p != 0]
        if len(fixed) != len(set(fixed)):
            raise ValueError(f"http/grpc/metrics ports must differ, got {ports}")
        if not self.host:
            raise ValueError("host must be a non-empty address")
        if not self.ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {self.ready_timeout_s}")
        if not self.exit_timeout_s >= 0:
            raise ValueError(f"exit_timeout_s must be >= 0, got {self.exit_timeout_s}")
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "extra_env", tuple((str(k), str(v)) for k, v in self.extra_env))
        object.__setattr__(self, "python_path", tuple(Path(p) for p in self.python_path))


def _pytriton_dir() -> Path:
    """The installed ``pytriton`` package dir (the wheel's Triton distribution lives there)."""
    # find_spec, not import: pytriton's __init__ imports zmq & co., which are absent because the
    # wheel is installed --no-deps (only its bundled binaries are used).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nvidia-pytriton wheel (package `pytriton`) is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def tritonserver_binary() -> Path:
    """Path of the ``tritonserver`` executable bundled in the nvidia-pytriton wheel."""
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise FileNotFoundError(f"tritonserver binary not found at {binary}")
    return binary


def _free_ports(count: int, host: str) -> list[int]:
    """``count`` distinct free TCP ports on ``host``.

    All sockets stay open until every port is chosen so the kernel cannot hand the same port out
    twice; another process could still grab one before Triton binds it (an unavoidable race).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with path.open("r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return ""


_ERROR_LINE_RE = re.compile(r"^(E\d{4} |error:)|UNAVAILABLE")


def _error_lines(path: Path, limit: int = 20) -> list[str]:
    """Up to ``limit`` Triton error lines (``E1123 ...``, ``error: ...``, UNAVAILABLE models)."""
    try:
        with path.open("r", errors="replace") as f:
            lines = [line for line in f if _ERROR_LINE_RE.search(line)]
    except FileNotFoundError:
        return []
    # Printed by every CPU-only start; never the cause of a failure.
    return [line for line in lines if "CudaDriverHelper" not in line][:limit]


def _libs_dir() -> Path:
    # libs/feedrec/serving/triton_server.py -> libs/. Derived from __file__ because `feedrec` is a
    # namespace package (no single __file__) and may also be installed editable.
    return Path(__file__).resolve().parents[2]


class TritonServer:
    """A supervised ``tritonserver`` child process.

    Usage::

        with TritonServer(TritonServerConfig(model_repository=repo)) as server:
            client = TritonRankerClient(server.grpc_url)

    ``__enter__`` calls start() + wait_ready() and stops the process if it never becomes ready.
    """

    def __init__(self, config: TritonServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._http_port = config.http_port
        self._grpc_port = config.grpc_port
        self._metrics_port = config.metrics_port

    # ----------------------------------------------------------------- properties
    @property
    def pid(self) -> int | None:
        """PID of the server process (None before start())."""
        return None if self._proc is None else self._proc.pid

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def grpc_port(self) -> int:
        return self._grpc_port

    @property
    def metrics_port(self) -> int:
        return self._metrics_port

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc`` (no scheme, as tritonclient expects)."""
        return f"{self.config.host}:{self._grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self._http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self._metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes (known after start())."""
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Launch the server (returns immediately; call wait_ready() next)."""
        if self.is_running():
            raise RuntimeError(f"TritonServer already running (pid {self.pid})")
        self._cleanup()  # a previous run that exited on its own may have left its temp dir
        cfg = self.config
        binary = tritonserver_binary()
        self._workdir = Path(tempfile.mkdtemp(prefix="feedrec-triton-"))
        backend_dir = self._build_backend_dir(self._workdir / "backends")

        zero = [name for name in ("http", "grpc", "metrics") if getattr(cfg, f"{name}_port") == 0]
        picked = dict(zip(zero, _free_ports(len(zero), cfg.host), strict=True))
        self._http_port = picked.get("http", cfg.http_port)
        self._grpc_port = picked.get("grpc", cfg.grpc_port)
        self._metrics_port = picked.get("metrics", cfg.metrics_port)

        self._log_path = cfg.log_path or (self._workdir / "tritonserver.log")
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary),
            f"--model-repository={cfg.model_repository.resolve()}",
            f"--backend-directory={backend_dir}",
            # The wheel's caches/ dir holds the response-cache plugin (PyTriton passes it too);
            # the built-in default is under /opt/tritonserver, which only exists in the image.
            f"--cache-directory={_pytriton_dir() / 'tritonserver' / 'caches'}",
            f"--http-address={cfg.host}",
            f"--http-port={self._http_port}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={self._grpc_port}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={self._metrics_port}",
            # Explicit mode + load everything at start-up: same start-up behaviour as the default
            # "none" mode, but later load/unload calls (new artifact versions) stay possible.
            "--model-control-mode=explicit",
            "--load-model=*",
            # CPU-only box: GPU metrics only produce NVML/DCGM warnings.
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            "--log-verbose=0",
            *cfg.extra_args,
        ]
        self._log_file = self._log_path.open("ab")
        logger.info("starting tritonserver: %s (log: %s)", " ".join(cmd), self._log_path)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self._build_env(),
            cwd=self._workdir,
            # Own process group: stop() can reach the python backend stubs (children of the
            # server) without touching anything else, and Ctrl-C in a terminal is not forwarded.
            start_new_session=True,
        )

    def restart(self) -> None:
        """Start again on the same ports, so clients keep their URLs (after a crash or kill).
        Orphaned backend stubs of the dead server are killed first (``stop()``)."""
        if self._proc is None:
            raise RuntimeError("restart() needs a server that was started")
        http, grpc, metrics = self._http_port, self._grpc_port, self._metrics_port
        self.stop()
        self.config = replace(self.config, http_port=http, grpc_port=grpc, metrics_port=metrics)
        self.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until ``GET /v2/health/ready`` returns 200.

        Raises:
            RuntimeError: the process exited before becoming ready, or did not become ready within
                ``timeout_s`` (default: config.ready_timeout_s). The message ends with the last
                40 lines of the server log.
        """
        if self._proc is None:
            raise RuntimeError("TritonServer.wait_ready() called before start()")
        timeout = self.config.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {code} before becoming ready.\n"
                    f"Last log lines ({self._log_path}):\n{self._log_tail()}"
                )
            if self._probe(url):
                logger.info("tritonserver ready: grpc %s http %s", self.grpc_url, self.http_url)
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"tritonserver not ready after {timeout:.0f}s.\n"
                    f"Last log lines ({self._log_path}):\n{self._log_tail()}"
                )
            time.sleep(0.25)

    def load_model(self, name: str, timeout_s: float = 300.0) -> None:
        """(Re)load model ``name`` from the repository as it is now (explicit model control).

        Triton loads the versions the config now names next to the ones it serves and only
        then retires the old ones, so requests keep being answered throughout; a version that
        fails to load leaves the old one serving. Raises RuntimeError with the server's reason.
        """
        if not self.is_running():
            raise RuntimeError("TritonServer.load_model() needs a running server")
        req = urllib.request.Request(
            f"{self.http_url}/v2/repository/models/{urllib.parse.quote(name)}/load",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                if resp.status == 200:
                    return
                body = resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
        raise RuntimeError(f"tritonserver could not load {name!r}: {body}\n{self._log_tail()}")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server: SIGTERM, wait, then SIGKILL the whole process group.

        Returns the exit code (None when the server was never started). Idempotent.
        """
        proc = self._proc
        if proc is None:
            self._cleanup()
            return None
        # Triton drains in-flight requests for up to --exit-timeout-secs after SIGTERM.
        grace = self.config.exit_timeout_s + 5.0 if timeout_s is None else timeout_s
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver pid %d ignored SIGTERM for %.0fs; killing", proc.pid, grace
                )
                self._kill_group(proc.pid)
                proc.wait()
        # Stubs normally exit with the server; a crashed server can orphan them in our group.
        self._kill_group(proc.pid)
        self._cleanup()
        return proc.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            # __exit__ is not called when __enter__ raises: do not leak the process.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _build_backend_dir(dest: Path) -> Path:
        """Create ``dest/python/`` = the wheel's python backend + the stub for this Python.

        Symlinks, not copies: the stub alone is ~20 MB. The python backend looks for the stub
        next to ``libtriton_python.so`` *as named by the backend directory*, so links suffice.
        """
        root = _pytriton_dir() / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise FileNotFoundError(f"no python backend stub for Python {version} at {stub}")
        python_dir = dest / "python"
        python_dir.mkdir(parents=True)
        for entry in (root / "backends" / "python").iterdir():
            if entry.name != "__pycache__":
                (python_dir / entry.name).symlink_to(entry)
        (python_dir / stub.name).symlink_to(stub)
        return dest

    def _build_env(self) -> dict[str, str]:
        env = os.environ.copy()
        libdir = sysconfig.get_config_var("LIBDIR")
        wheel_libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
        ld = [str(libdir), str(wheel_libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
        # Venv bin first: the stub's embedded interpreter resolves `python3` on PATH to find its
        # prefix, i.e. this decides which site-packages the models can import from.
        path = [str(Path(sys.executable).parent), env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(p for p in path if p)
        # The stub's interpreter is isolated (PYTHONPATH ignored, see module doc): the venv
        # comes from PATH above; extra dirs go through a variable the model file reads itself.
        extra = [str(p.resolve()) for p in self.config.python_path] + [str(_libs_dir())]
        env[STUB_PYTHONPATH_ENV] = os.pathsep.join(extra)
        env.update(dict(self.config.extra_env))
        return env

    @staticmethod
    def _probe(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _log_tail(self) -> str:
        """Error lines from the whole log (if any) + the last 40 lines, for exceptions."""
        if self._log_file is not None:
            self._log_file.flush()
        if self._log_path is None:
            return ""
        tail = _tail(self._log_path)
        # The tail is mostly Triton's option table; the cause (a model's traceback, a bad
        # flag) is usually an E-level line or an UNAVAILABLE model status further up.
        errors = [line for line in _error_lines(self._log_path) if line not in tail]
        head = "Error lines:\n" + "".join(errors) + "...\n" if errors else ""
        return head + tail

    @staticmethod
    def _kill_group(pgid: int) -> None:
        # The group id equals the server PID (start_new_session=True), so this reaches only the
        # server and its stubs.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _cleanup(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            # Keep a caller-provided log; the temp dir (backend links, default log) goes.
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
