"""A private PostgreSQL cluster from Debian's package, for the tests and `make cluster-demo`.

``initdb`` into a folder, ``pg_ctl start`` on a loopback port, one database, trust
authentication on loopback only. PostgreSQL refuses to run as root: as root, every
command runs as the ``postgres`` user the Debian package creates (``runuser``), and the
folder is handed to that user. Nothing here is used by a running Edison node.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class LocalDbUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing, or it could not start (the reason is the text)."""


def pg_bin_dir() -> Path | None:
    """Debian's PostgreSQL binaries (the newest major version), or None when absent."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPostgres:
    """One private PostgreSQL server: its folder, port and database."""

    root: Path
    port: int
    database: str = "edison"
    user: str = "edison"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run_as(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        if shutil.which("runuser") is None:
            raise LocalDbUnavailable("running as root and no runuser to drop to 'postgres'")
        return ["runuser", "-u", "postgres", "--"]

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        bindir = pg_bin_dir()
        if bindir is None:
            raise LocalDbUnavailable("PostgreSQL is not installed (apt-get install postgresql)")
        argv = [*self._run_as(), str(bindir / args[0]), *args[1:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise LocalDbUnavailable(f"{args[0]} failed: {proc.stderr.strip() or proc.stdout}")
        return proc

    def _own(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            for path in self.root.rglob("*"):
                shutil.chown(path, "postgres", "postgres")

    def init(self) -> None:
        """Create the cluster in ``root/data`` (once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Every folder above must be enterable by 'postgres' for it to reach its data.
            for parent in [self.root, *self.root.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        if (self.data / "PG_VERSION").is_file():
            return
        self._own()
        self._cmd(
            "initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    def start(self) -> None:
        """Start the server and create the database; returns once it accepts connections."""
        self.init()
        self._own()
        log = self.root / "postgres.log"
        self._cmd(
            "pg_ctl", "-D", str(self.data), "-l", str(log), "-o", f"-p {self.port}", "-w",
            "-t", "60", "start",
        )  # fmt: skip
        proc = self._cmd(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
        )  # fmt: skip
        if proc.stdout.strip() != "1":
            self._cmd(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                self.database,
            )  # fmt: skip

    def url_of(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database ``name`` on this server (dropped first when present);
        returns its URL. Separate databases keep separate clusters on one server."""
        for sql in (f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'):
            self._cmd(
                "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d",
                "postgres", "-tAc", sql,
            )  # fmt: skip
        return self.url_of(name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash, for the database-down tests)."""
        if (self.data / "postmaster.pid").exists():
            self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def wait_stopped(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run one statement with psql; its unaligned output."""
        proc = self._cmd(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d",
            database or self.database, "-tAc", sql,
        )  # fmt: skip
        return proc.stdout.strip()
