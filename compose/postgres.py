"""A PostgreSQL server run from the system binaries in a private directory (tests, the local
docker-compose harness, benchmarks): ``initdb`` + ``pg_ctl``, no Docker, no mock.

The cluster listens on 127.0.0.1 at a port reserved through :mod:`compose.ports` (and on a
unix socket inside its directory). Authentication is ``scram-sha-256`` for every connection;
the password is random, written only to the libpq password file ``pgpass`` (mode 0600)
that :attr:`LocalPostgres.dsn` names with ``passfile=``: it never appears in a URL, command
line or environment variable. The server refuses to run as root, so when this process is
root the cluster's directory is given to the ``postgres`` system user (created by the Debian
package) and the server programs run as that user.

Binaries: ``$PG_BIN`` if set, else the newest ``/usr/lib/postgresql/*/bin``, else ``PATH``
(``make system-packages`` installs ``postgresql``).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from compose.ports import free_port

__all__ = ["LocalPostgres", "PostgresUnavailable", "pg_bin_dir"]

DB_NAME = "broker"
MAX_SOCKET_PATH = 100
DB_USER = "ctrain"
START_TIMEOUT_S = 120


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL programs are missing or the server did not start."""


def pg_bin_dir() -> Path:
    if env := os.environ.get("PG_BIN"):
        return Path(env)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if versions and (versions[-1] / "initdb").exists():
        return versions[-1]
    found = shutil.which("initdb")
    if found is None:
        raise PostgresUnavailable("PostgreSQL server programs (initdb, pg_ctl) not found: "
                                  "install the postgresql package (make system-packages)")
    return Path(found).resolve().parent


class LocalPostgres:
    """One PostgreSQL cluster under ``root`` (created if missing). ``start()`` initialises it
    on first use; ``stop()``/``start()`` restart it with its data; ``kill()`` is ``kill -9``
    of the postmaster; ``destroy()`` stops it and removes the directory."""

    def __init__(self, root: Path | None = None, *, port: int | None = None,
                 listen: str = "127.0.0.1") -> None:
        # a fresh directory under the system temp dir: the postgres user must be able to reach
        # it, and a pytest tmp_path under /tmp/pytest-of-root (mode 0700) is not reachable
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ct-pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        if len(str(self.socket_dir.absolute() / ".s.PGSQL.65535.lock")) > MAX_SOCKET_PATH:
            # a unix socket path is at most 107 bytes: a deep root (a compose run directory)
            # gets a short directory named after it, the same one on every start (/tmp
            # itself: the harness points TMPDIR into the run directory)
            tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
            self.socket_dir = Path("/tmp") / f"ct-pgsock-{tag}"  # noqa: S108 - a private 0700 dir
        self.passfile = self.root / "pgpass"
        self.port = port if port is not None else free_port()
        self.listen = listen
        self.bin = pg_bin_dir()
        self._as_postgres = os.geteuid() == 0
        self._user = pwd.getpwnam("postgres") if self._as_postgres else None

    @property
    def dsn(self) -> str:
        return (f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"
                f"?passfile={self.passfile}&sslmode=disable")

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self._user is not None:
            kw = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              check=False, timeout=START_TIMEOUT_S, cwd=self.root,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}, **kw)

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _init(self) -> None:
        password = secrets.token_urlsafe(24)
        self.root.chmod(0o711)
        self._chown(self.root)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        pwfile = self.root / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self._chown(pwfile)
        try:
            done = self._run(self.bin / "initdb", "-D", self.data, "-U", DB_USER,
                             "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                             "--no-instructions")
        finally:
            pwfile.unlink()
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip()[-2000:]}")
        if self.listen not in ("127.0.0.1", "localhost"):  # other hosts (a compose network)
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write("host all all all scram-sha-256\n")
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # host:port:database:user:password, any host name
            f.write(f"*:{self.port}:*:{DB_USER}:{password}\n")
        # first start on the unix socket only: nothing (a TCP health check included) sees
        # the server before its database exists
        self._pg_ctl_start("")
        import psycopg  # the client side: this process reads the password file

        try:
            with psycopg.connect(host=str(self.socket_dir), port=self.port, user=DB_USER,
                                 dbname="postgres", passfile=str(self.passfile),
                                 autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DB_NAME}")
        finally:
            self.stop()

    def serve_foreground(self) -> None:
        """Initialise on first use, then become the server (``exec postgres``, as the
        ``postgres`` user when root): the compose service, supervised by the harness or the
        container engine, which stop it with SIGTERM (a clean "smart" shutdown)."""
        self._grant_traverse()
        if not (self.data / "PG_VERSION").exists():
            self._init()
        self._ensure_socket_dir()
        argv = [str(self.bin / "postgres"), "-D", str(self.data),
                *self._server_options(self.listen)]
        if self._user is not None:
            os.setgroups([])
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)
        os.execv(argv[0], argv)  # noqa: S606 - fixed program, no shell wanted

    def _server_options(self, listen: str) -> list[str]:
        return ["-p", str(self.port), "-k", str(self.socket_dir),
                "-c", f"listen_addresses={listen}", "-c", "max_connections=200",
                "-c", "fsync=on", "-c", "synchronous_commit=on"]

    def _ensure_socket_dir(self) -> None:
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        st = self.socket_dir.lstat()
        owners = {os.geteuid()} | ({self._user.pw_uid} if self._user is not None else set())
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners:
            raise PostgresUnavailable(f"{self.socket_dir} is not a directory of this user's")
        self._chown(self.socket_dir)

    def _pg_ctl_start(self, listen: str | None = None) -> None:
        self._ensure_socket_dir()
        options = " ".join(self._server_options(self.listen if listen is None else listen))
        done = self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "server.log",
                         "-w", "-t", str(START_TIMEOUT_S), "-o", options, "start")
        if done.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed: {done.stderr.strip()[-1000:]}; "
                                      f"log: {self.log_tail()}")

    def _grant_traverse(self) -> None:
        """As root, let the ``postgres`` user reach the cluster directory: add search (x,
        not read) permission for others on each ancestor that lacks it (the local harness
        keeps its run directory 0700; under Docker the volume path is reachable already)."""
        if self._user is None:
            return
        for parent in self.root.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod((mode & 0o7777) | 0o001)

    def start(self) -> LocalPostgres:
        if not (self.data / "PG_VERSION").exists():
            self._init()
        self._pg_ctl_start()
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """``kill -9`` of the postmaster (its backends exit when they notice)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def running(self) -> bool:
        return self._run(self.bin / "pg_ctl", "-D", self.data, "status").returncode == 0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if not self.socket_dir.is_relative_to(self.root):
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def main(argv: list[str] | None = None) -> int:
    """``python -m compose.postgres serve --root DIR --port N [--listen HOST]``: the
    docker-compose ``postgres`` service. Clients use ``DIR/pgpass`` (``passfile=``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compose.postgres")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        LocalPostgres(args.root, port=args.port, listen=args.listen).serve_foreground()
    except PostgresUnavailable as exc:
        print(f"postgres: error: {exc}", flush=True)
        return 1
    return 0  # not reached: serve_foreground execs the server


if __name__ == "__main__":
    raise SystemExit(main())
