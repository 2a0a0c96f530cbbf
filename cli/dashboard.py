"""``sparsealloc dashboard``: optuna-dashboard on the study store."""

from __future__ import annotations

import argparse
import errno
import shutil
import signal
import socket
import subprocess
import sys
import threading

from sparsealloc.cli.study import DEFAULT_STORAGE
from sparsealloc.core.errors import SpecError


def register(sub) -> None:
    parser = sub.add_parser("dashboard", help="serve optuna-dashboard on the study store")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help=f"study store URL (default {DEFAULT_STORAGE}); a SQLite file must exist")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    parser.add_argument("--artifact-dir", default=None,
                        help="artifact folder (exported plans; default: the one sparsealloc export uses)")
    parser.set_defaults(handler=run)


def dashboard_command(storage_url: str, host: str, port: int, artifact_dir: str | None = None) -> list[str]:
    """The optuna-dashboard command line for the store."""
    exe = shutil.which("optuna-dashboard")
    if exe is None:
        raise SpecError("optuna-dashboard is not installed; install it with: pip install 'sparsealloc[dashboard]'")
    cmd = [exe, storage_url, "--host", host, "--port", str(port)]
    if artifact_dir:
        cmd += ["--artifact-dir", artifact_dir]
    return cmd


def check_port(host: str, port: int) -> None:
    """Check that the dashboard can listen on ``host:port`` (bound and released at once).

    Raises:
        SpecError: the port is taken, the host is not an address of this machine, or binding is
            not allowed; the message suggests ``--port``.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SpecError(f"expected --host to be an address of this machine, but {host!r} gave: {exc.strerror}") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SpecError(f"expected a free port, but port {port} on {host} is already in use "
                                f"(another dashboard?); choose another with --port") from None
            raise SpecError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port "
                            f"or --host") from None


def run(args: argparse.Namespace) -> int:
    from sparsealloc.storage.rdb import open_storage, parse_storage_url

    url = parse_storage_url(args.storage)
    if not 0 < args.port < 65536:
        raise SpecError(f"expected a port in 1..65535, but got {args.port}")
    # A mistyped SQLite path is an error, not a new empty store; a server database gets the schema
    # (docker compose starts the dashboard before the first study).
    open_storage(url, create=not url.startswith("sqlite"))
    check_port(args.host, args.port)
    from sparsealloc.storage.artifacts import default_artifact_dir

    artifact_dir = args.artifact_dir or str(default_artifact_dir(url))
    cmd = dashboard_command(url, args.host, args.port, artifact_dir)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard  (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd)
    stopped: list[int] = []

    def _stop(signum, _frame) -> None:  # SIGTERM (kill, systemd, docker stop) must not orphan the server
        stopped.append(signum)
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        code = proc.wait()
        return 0 if stopped else code
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()
