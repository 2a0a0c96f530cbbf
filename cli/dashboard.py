"""``sparsealloc dashboard``: optuna-dashboard on the study store."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading

from sparsealloc.cli.study import DEFAULT_STORAGE
from sparsealloc.core.errors import SpecError


def register(sub) -> None:
    parser = sub.add_parser("dashboard", help="serve optuna-dashboard on the study store")
    parser.add_argument("--storage", default=DEFAULT_STORAGE)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
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


def run(args: argparse.Namespace) -> int:
    from sparsealloc.storage.rdb import open_storage, parse_storage_url

    url = parse_storage_url(args.storage)
    open_storage(url)  # reachable, schema created
    if not 0 < args.port < 65536:
        raise SpecError(f"expected a port in 1..65535, but got {args.port}")
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
