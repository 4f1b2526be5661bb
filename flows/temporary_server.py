"""Prefect's temporary API server, started as a command's first act so that it boots while sftflow imports.

With no API URL configured, Prefect starts a temporary server the first time a client needs one: the command
imports sftflow's modules (~3.5 s on 2 cores), then Prefect imports its whole server package in this process
(~5 s) only to spawn a subprocess that imports it again and opens the database (~8 s more to healthy). A fully
cached `sftflow run` spent 16 of its 20 s on that, one step after the other. So `sftflow run` and `sftflow task`
spawn the same subprocess (Prefect's own command: uvicorn on `prefect.server.api.server:create_app`, UI off,
ephemeral mode, this process's environment) before importing anything heavy, and point Prefect at it
(PREFECT_API_URL, then Prefect's global settings refreshed) once the pipeline is imported and the server answers.
The server stops when the command ends, as Prefect's does.

The spawn is a guess made before Prefect is imported: when Prefect then turns out to have an API URL after all (a
profile, prefect.toml, a test harness's settings) or to forbid temporary servers, the spawned one is stopped unused.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.core.errors import SftflowError

PORT_IN_USE = 3  # uvicorn's exit code when it cannot start, a taken port included (Prefect respawns on another)
LOG_KEEP_BYTES = 1 << 20
MAX_RESPAWNS = 1  # the port came free from the OS a moment before: one clash is already unlikely
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a loopback server: never via a proxy
LOCAL_UI = "http://127.0.0.1:4200"  # `make ui-prefect`: the same database's runs, in Prefect's UI
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def free_port() -> int:
    """Return a loopback port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_path() -> Path:
    """Return the file the temporary servers' output goes to: temporary-server.log in PREFECT_HOME."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / "temporary-server.log"


def healthy(api_url: str) -> bool:
    """Return True once the server at `api_url` answers its health check."""
    try:
        with NO_PROXY.open(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class ServerExited(SftflowError):
    """The temporary server's process ended before it answered (a broken database, a bad setting)."""


class TemporaryServer:
    """One temporary Prefect server subprocess on a loopback port: spawn() it, then serving() once Prefect is
    imported."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> TemporaryServer:
        """Start the server process on a free port, without waiting for it or importing Prefect; return self. Its
        output (errors only) goes to log_path(), not into the command's."""
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # found, not imported
        self.port = free_port()
        log = log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if not log.exists() or log.stat().st_size < LOG_KEEP_BYTES else "w"  # the latest, not forever
        with log.open(mode, encoding="utf-8") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} temporary server on port {self.port} for pid "
                      f"{os.getpid()}\n")
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **SERVER_ENV}, stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        """Stop the server process, if it runs (SIGTERM, then SIGKILL after 5 s), as Prefect stops its own."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def wait(self, timeout_s: float) -> None:
        """Block until the server answers, respawning it once on another port when its port was taken (only once:
        a server that cannot open its database exits the same way). Raise ServerExited when it ended, RuntimeError
        (the words Prefect uses, which the CLI explains in one line) when it does not answer within `timeout_s`."""
        deadline, respawns = time.monotonic() + timeout_s, 0
        while not healthy(self.api_url):
            if self.process.poll() == PORT_IN_USE and respawns < MAX_RESPAWNS:
                respawns += 1
                self.spawn()
            elif self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise ServerExited(f"Prefect's temporary API server exited with code {code} before it answered; "
                                   f"its output is in {log_path()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
            time.sleep(0.1)


def wants_temporary_server() -> bool:
    """Return True when Prefect (imported now) has no API URL and may start a temporary server."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def spawn_early() -> TemporaryServer | None:
    """Spawn a temporary server now when Prefect will likely need one (no PREFECT_API_URL in the environment, or,
    once Prefect is imported, in its settings); return it, or None."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect" in sys.modules and not wants_temporary_server():
        return None
    server = TemporaryServer().spawn()
    atexit.register(server.stop)  # at exit, after Prefect's own exit handlers have sent their last logs
    return server


@contextmanager
def serving(server: TemporaryServer | None, meanwhile: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Run the block with Prefect pointed at `server` (spawned by spawn_early) once it answers, calling `meanwhile`
    while it boots; a server Prefect turns out not to need is stopped at once. Prefect is imported here.

    The temporary server has no UI; the flow run's "View at" link points at PREFECT_UI_URL, by default the UI of
    `make ui-prefect` (http://127.0.0.1:4200), which serves the same database."""
    meanwhile()
    if server is None or not wants_temporary_server():
        if server is not None:
            server.stop()
        yield
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    logging.getLogger("prefect").info("Using temporary server on %s (started with the command)", server.api_url)
    added = {"PREFECT_API_URL": server.api_url, "PREFECT_UI_URL": os.environ.get("PREFECT_UI_URL") or LOCAL_UI}
    os.environ.update(added)  # child processes (accelerate's) reach it too
    refresh_global_settings_context()  # every thread's Prefect client, not only this context's
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        refresh_global_settings_context()
