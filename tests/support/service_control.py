"""Stop and start the Redis and Postgres that scripts/with-services.sh started, for fault tests.

with-services.sh exports handles: ``TEST_REDIS_PORT`` / ``TEST_REDIS_PID`` and
``TEST_PG_PORT`` / ``TEST_PG_DATA`` / ``TEST_PG_BIN`` / ``TEST_SERVICES_DIR``. A stopped
server comes back on the same port with the same options, so every later test finds it
as it was (minus Redis's contents: it keeps no data on disk).

with-services.sh stops the Redis it started by its PID. A Redis restarted here is
another process, so it runs under a small watchdog that stops it once
``TEST_SERVICES_DIR`` is gone, which is the last thing with-services.sh's cleanup does.
Postgres needs nothing of the kind: ``pg_ctl stop`` on the data directory stops
whichever postmaster runs there.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.02

_RESTARTED_REDIS_PIDFILE = "redis-restarted.pid"
# Runs in its own session, so neither pytest's exit nor a Ctrl-C to pytest stops it.
_REDIS_WATCHDOG = r"""
dir=$1; port=$2
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$dir" --logfile "$dir/redis-restarted.log" &
pid=$!
echo "$pid" > "$dir/redis-restarted.pid"
while [ -d "$dir" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
"""


@dataclass(frozen=True)
class ServiceHandles:
    redis_port: int
    redis_pid: int
    pg_port: int
    pg_data: Path
    pg_bin: Path
    services_dir: Path

    @classmethod
    def from_environment(cls) -> ServiceHandles:
        names = (
            "TEST_REDIS_PORT",
            "TEST_REDIS_PID",
            "TEST_PG_PORT",
            "TEST_PG_DATA",
            "TEST_PG_BIN",
            "TEST_SERVICES_DIR",
        )
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            pytest.fail(f"{', '.join(missing)} not set: run the fault tests through scripts/with-services.sh")
        return cls(
            redis_port=int(os.environ["TEST_REDIS_PORT"]),
            redis_pid=int(os.environ["TEST_REDIS_PID"]),
            pg_port=int(os.environ["TEST_PG_PORT"]),
            pg_data=Path(os.environ["TEST_PG_DATA"]),
            pg_bin=Path(os.environ["TEST_PG_BIN"]),
            services_dir=Path(os.environ["TEST_SERVICES_DIR"]),
        )


class ServiceControl:
    """Kill and restart Redis, stop and start Postgres; always on the ports the tests use."""

    def __init__(self, handles: ServiceHandles) -> None:
        self.handles = handles
        self._postgres_options = self._read_postgres_options()

    # -- Redis ---------------------------------------------------------------------

    def redis_is_up(self) -> bool:
        return _answers_ping(self.handles.redis_port)

    def kill_redis(self) -> None:
        """SIGKILL the running Redis, as a crash would, and wait until its port refuses."""
        os.kill(self._current_redis_pid(), signal.SIGKILL)
        _wait_for(lambda: not _port_open(self.handles.redis_port), "Redis to go away")

    def start_redis(self) -> None:
        """A fresh, empty Redis on the same port (under the watchdog), answering PING."""
        if self.redis_is_up():
            return
        pidfile = self.handles.services_dir / _RESTARTED_REDIS_PIDFILE
        pidfile.unlink(missing_ok=True)
        launcher = (
            f'setsid bash -c {shlex.quote(_REDIS_WATCHDOG)} redis-watchdog "$0" "$1" </dev/null >/dev/null 2>&1 &'
        )
        subprocess.run(
            ["bash", "-c", launcher, str(self.handles.services_dir), str(self.handles.redis_port)], check=True
        )
        _wait_for(self.redis_is_up, "the restarted Redis to answer PING")

    @contextmanager
    def redis_killed(self) -> Iterator[None]:
        """Redis is dead inside the block and running again (empty) after it, however it ends."""
        self.kill_redis()
        try:
            yield
        finally:
            self.start_redis()

    @contextmanager
    def redis_frozen(self) -> Iterator[None]:
        """Redis is alive but answers nothing (SIGSTOP) inside the block: a hung server, not a dead one."""
        pid = self._current_redis_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
            _wait_for(self.redis_is_up, "Redis to answer again")

    def _current_redis_pid(self) -> int:
        pidfile = self.handles.services_dir / _RESTARTED_REDIS_PIDFILE
        if pidfile.exists():
            return int(pidfile.read_text().strip())
        return self.handles.redis_pid

    # -- Postgres ------------------------------------------------------------------

    def postgres_is_up(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def stop_postgres(self) -> None:
        """A fast shutdown: sessions are cut, the port closes."""
        self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop")
        _wait_for(lambda: not _port_open(self.handles.pg_port), "Postgres to close its port")

    def start_postgres(self) -> None:
        """Postgres again, with the options with-services.sh started it with (port included)."""
        if self.postgres_is_up():
            return
        log = self.handles.pg_data.parent / "server.log"
        self._pg_ctl("-l", str(log), "-w", "-t", "30", "-o", self._postgres_options, "start")
        _wait_for(lambda: _port_open(self.handles.pg_port), "Postgres to accept connections")

    @contextmanager
    def postgres_stopped(self) -> Iterator[None]:
        self.stop_postgres()
        try:
            yield
        finally:
            self.start_postgres()

    def ensure_running(self) -> None:
        self.start_redis()
        self.start_postgres()

    def _read_postgres_options(self) -> str:
        # postmaster.opts holds the command line of the running server: reuse it as is,
        # minus the binary and the data directory, which pg_ctl adds itself.
        words = shlex.split((self.handles.pg_data / "postmaster.opts").read_text())
        options: list[str] = []
        skip_next = False
        for word in words[1:]:
            if skip_next:
                skip_next = False
                continue
            if word == "-D":
                skip_next = True
                continue
            options.append(word)
        return shlex.join(options)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.handles.pg_bin / "pg_ctl"), "-D", str(self.handles.pg_data), *args]
        if os.geteuid() == 0:  # Postgres refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)  # waits for a real server process, not for the code under test
