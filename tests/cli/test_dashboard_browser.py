"""The dashboard in a real browser: ``sparsealloc dashboard`` on a finished tiny study, rendered by
headless Chromium (``--dump-dom`` after virtual time, since the dashboard is a client-side SPA).

Checks that the rendered study page shows the study name, that the rendered trial list shows the
trial count, and that the JSON API the page calls answers; keeps a screenshot as an artifact
(``$SPARSEALLOC_TEST_ARTIFACTS`` if set, else ``artifacts/`` under pytest's temporary folder; the
path is printed and recorded as the ``dashboard_screenshot`` property).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sparsealloc.cli.main import main

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
STUDY = "browser-check-study"
N_TRIALS = 6
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read().decode())


def visible_text(dom: str) -> str:
    """The text of a dumped DOM, one element's text per line (scripts and styles removed)."""
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", dom, flags=re.S | re.I)
    lines = (html.unescape(part).strip() for part in re.split(r"<[^>]+>", dom))
    return "\n".join(line for line in lines if line)


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own session; the whole group is killed if it hangs."""
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"chromium did not finish in {timeout} s: {err[-1000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def artifact_dir(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SPARSEALLOC_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_dashboard_renders_in_chromium(tiny_llama_dir, text_file, tmp_path, tmp_path_factory, record_property):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (install it with: apt-get install -y chromium)")
    if shutil.which("optuna-dashboard") is None:
        pytest.skip("optuna-dashboard is not installed (pip install 'sparsealloc[dashboard]')")
    url = f"sqlite:///{tmp_path / 's.db'}"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--quiet", "study", "run", "--name", STUDY, "--storage", url, "--model", str(tiny_llama_dir),
                     "--calib-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "16",
                     "--eval-text", str(text_file), "--eval-seq-len", "16", "--eval-windows", "2",
                     "--target-sparsity", "0.5", "--trials", str(N_TRIALS), "--export", str(tmp_path / "out")])
    assert code == 0, err.getvalue()

    port = free_port()
    exe = shutil.which("sparsealloc")
    cmd = ([exe] if exe else [sys.executable, "-P", "-m", "sparsealloc.cli"]) + [
        "dashboard", "--storage", url, "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        listing, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            try:
                listing = get_json(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        assert listing is not None, f"dashboard did not answer on {base} (rc={server.poll()})"
        (summary,) = [s for s in listing["study_summaries"] if s["study_name"] == STUDY]
        study_id = summary["study_id"]
        # the API calls the page makes answer with the study and its trials
        detail = get_json(f"{base}/api/studies/{study_id}")
        assert detail["name"] == STUDY and len(detail["trials"]) == N_TRIALS
        # the exported plan is a study artifact the dashboard serves (default folder beside the db)
        (artifact,) = detail["artifacts"]
        assert artifact["filename"] == "best.json"
        served = get_json(f"{base}/artifacts/{study_id}/{artifact['artifact_id']}")
        assert served == json.loads((tmp_path / "out" / "best.json").read_text())
        page = f"{base}/dashboard/studies/{study_id}"

        run = chromium(["--dump-dom", page], tmp_path / "profile-dom")
        assert run.returncode == 0, run.stderr[-2000:]
        text = visible_text(run.stdout)
        assert f"{STUDY} (id={study_id})" in text, text[:2000]  # the SPA rendered the study page
        assert "Best Trial (number=" in text

        run = chromium(["--dump-dom", f"{page}/trials"], tmp_path / "profile-trials")
        assert run.returncode == 0, run.stderr[-2000:]
        text = visible_text(run.stdout)
        assert f"{N_TRIALS} Trials" in text, text[:2000]
        assert all(f"Trial {n}" in text for n in range(N_TRIALS))

        shot = tmp_path / "dashboard.png"
        run = chromium([f"--screenshot={shot}", "--window-size=1280,900", page], tmp_path / "profile-shot")
        assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)
        server.communicate(timeout=10)

    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        assert len(image.convert("RGB").getcolors(maxcolors=1280 * 900) or []) > 20  # not a blank page
    kept = artifact_dir(tmp_path_factory) / "dashboard.png"
    shutil.copyfile(shot, kept)
    record_property("dashboard_screenshot", str(kept))
    print(f"dashboard screenshot: {kept}")
