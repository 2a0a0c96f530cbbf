"""Hostile surroundings: odd study names, read-only store folders, a full disk.

* Study names with spaces, quotes, slashes, backslashes, unicode and 200 characters work end to end
  (run, list, show, export, report, resume) on SQLite and PostgreSQL; export and report file names
  never depend on the study name. Longer names, control characters and padding are one-line errors.
* A read-only store folder (or store file) is a one-line error, exit 2, the store untouched. As root
  (who ignores permission bits) the command runs without CAP_DAC_OVERRIDE via ``capsh``.
* A full disk: SQLite hits RLIMIT_FSIZE in a subprocess mid-study → one line, exit 2, the store
  passes its integrity check and ``study resume`` finishes it; a write that fails with ENOSPC
  during export or report → one line, and an earlier ``best.json`` is left whole.

A newcomer's first hour (issue 21): Ctrl-C names the command that finishes the study, ``study
show`` and ``report`` say how to validate, the dashboard refuses a mistyped store or a busy port,
``| head`` ends quietly, ``study run --help`` documents its flags, and SQLite URLs with missing
slashes get a hint.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shlex
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.cli.main import build_parser, main
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.study import resume_command
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
ODD_NAMES = {
    "spaces": "my study 50%",
    "quotes": "it's a \"quoted\" name",
    "slashes": "runs/2024\\jan/../s70",
    "unicode": "稀疏-Sparsität-😀-ñ",
    "shell": "$(rm -rf ~); `echo`; <b>&amp;</b> * ?",
    "longest": "n" * 199 + "é",
}


def data_args(model_dir: Path, text: Path) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "16",
            "--eval-text", str(text), "--eval-seq-len", "16", "--eval-windows", "2", "--device", "cpu"]


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sqlite_rows(db: Path) -> dict[str, list]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        con.close()


def _pg_reason() -> str | None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL answers at {PG_URL}: {str(exc).strip().splitlines()[0]}"


# --------------------------------------------------------------------------- odd names
@pytest.fixture(scope="module")
def odd_store(tmp_path_factory, tiny_llama_dir, text_file):
    """One SQLite store holding a finished 3-trial study under each odd name (run by the CLI)."""
    root = tmp_path_factory.mktemp("odd")
    url = f"sqlite:///{root / 's.db'}"
    for name in ODD_NAMES.values():
        code, _, err = cli(["--quiet", "study", "run", "--name", name, "--storage", url,
                            *data_args(tiny_llama_dir, text_file), "--trials", "3", "--validate-top", "2"])
        assert code == 0, (name, err)
    return url, root


@pytest.mark.parametrize("kind", sorted(ODD_NAMES))
def test_an_odd_study_name_works_end_to_end(kind, odd_store, tmp_path):
    url, _ = odd_store
    name = ODD_NAMES[kind]
    code, out, err = cli(["--quiet", "study", "list", "--storage", url])
    assert code == 0 and f"{name}  objectives=1  complete=3" in out.splitlines(), out

    code, out, err = cli(["--quiet", "study", "show", name, "--storage", url])
    assert code == 0 and out.startswith(f"study: {name}\n") and "complete=3" in out, err

    out_dir = tmp_path / "export"
    code, out, err = cli(["--quiet", "export", name, "--storage", url, "--out", str(out_dir)])
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["best.json"]  # the name is not a file name
    assert AllocationPlan.load(out_dir / "best.json").provenance["study"] == name
    from optuna.artifacts import get_all_artifact_meta  # the export is attached as a study artifact

    study = optuna.load_study(study_name=name, storage=url)
    assert [m.filename for m in get_all_artifact_meta(study)] == ["best.json"]

    report_dir = tmp_path / "report"
    code, out, err = cli(["--quiet", "report", name, "--storage", url, "--out", str(report_dir), "--no-model"])
    assert code == 0, err
    assert {p.parent for p in report_dir.rglob("*")} == {report_dir}  # nothing outside the folder
    assert name in (report_dir / "summary.md").read_text(encoding="utf-8")

    code, out, err = cli(["--quiet", "study", "resume", name, "--storage", url, "--trials", "3", "--no-validate"])
    assert code == 0 and "trials this run: {}" in out, err


@pytest.mark.parametrize(("name", "fragment"), [
    ("n" * 201, "(201 characters)"),
    ("x" * 5000, "(5000 characters)"),
    ("tab\there", "printable"),
    ("new\nline", "printable"),
    ("nul\x00byte", "printable"),
    ("zero\u200bwidth", "printable"),
    (" padded", "surrounding spaces"),
])
def test_an_unusable_study_name_is_one_clean_error(name, fragment, tiny_llama_dir, text_file, tmp_path, capsys):
    db = tmp_path / "s.db"
    code = main(["--quiet", "study", "run", "--name", name, "--storage", f"sqlite:///{db}",
                 *data_args(tiny_llama_dir, text_file), "--trials", "2"])
    line = one_error_line(capsys.readouterr().err, "name must be", fragment)
    assert code == 2 and len(line) < 400
    assert not db.exists()


def test_odd_names_on_postgresql(tiny_llama_dir, text_file, tmp_path):
    reason = _pg_reason()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:8]
    names = [f"{ODD_NAMES['quotes']} {tag}", f"{ODD_NAMES['unicode']} {tag}", f"{ODD_NAMES['shell']} {tag}"]
    try:
        for name in names:
            code, _, err = cli(["--quiet", "study", "run", "--name", name, "--storage", PG_URL,
                                *data_args(tiny_llama_dir, text_file), "--trials", "2", "--no-validate"])
            assert code == 0, err
            code, out, err = cli(["--quiet", "export", name, "--storage", PG_URL, "--out", str(tmp_path / tag),
                                  "--artifact-dir", str(tmp_path / "artifacts")])
            assert code == 0, err
            assert AllocationPlan.load(tmp_path / tag / "best.json").provenance["study"] == name
        code, out, _ = cli(["--quiet", "study", "list", "--storage", PG_URL])
        listed = out.splitlines()
        assert all(any(line.startswith(f"{name}  objectives=1  complete=2") for line in listed) for name in names)
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=name, storage=PG_URL)


# --------------------------------------------------------------------------- read-only store folders
def unprivileged(argv: list[str]) -> list[str]:
    """``python -m sparsealloc.cli ARGV`` that honours permission bits, even when run as root."""
    command = [sys.executable, "-P", "-m", "sparsealloc.cli", *argv]
    if os.geteuid() != 0:
        return command
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search", *command]
    pytest.skip("running as root without capsh or setpriv: permission bits cannot be enforced")


@contextlib.contextmanager
def read_only(path: Path):
    mode = path.stat().st_mode
    path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield path
    finally:
        path.chmod(mode)


@pytest.fixture
def small_store(tmp_path, tiny_llama_dir, text_file):
    folder = tmp_path / "store"
    folder.mkdir()
    db = folder / "s.db"
    code, _, err = cli(["--quiet", "study", "run", "--name", "ro", "--storage", f"sqlite:///{db}",
                        *data_args(tiny_llama_dir, text_file), "--trials", "2", "--no-validate"])
    assert code == 0, err
    return db


def run_unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(unprivileged(argv), capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("action", ["run", "resume", "list", "export"])
def test_a_read_only_store_folder_is_one_clean_error(action, small_store, tiny_llama_dir, text_file, tmp_path):
    folder = small_store.parent
    url = f"sqlite:///{small_store}"
    argv = {"run": ["study", "run", "--name", "new", "--storage", f"sqlite:///{folder / 'new.db'}",
                    *data_args(tiny_llama_dir, text_file), "--trials", "2"],
            "resume": ["study", "resume", "ro", "--storage", url, "--trials", "4", "--no-validate"],
            "list": ["study", "list", "--storage", url],
            "export": ["export", "ro", "--storage", url, "--out", str(folder / "out")]}[action]
    before = sqlite_rows(small_store)
    files = sorted(p.name for p in folder.iterdir())
    with read_only(folder):
        result = run_unprivileged(["--quiet", *argv])
        listing = sorted(p.name for p in folder.iterdir())
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr, "read-only", str(folder))
    assert listing == files  # no new store, no export folder
    assert sqlite_rows(small_store) == before


def test_a_read_only_store_file_is_one_clean_error(small_store):
    before = sqlite_rows(small_store)
    with read_only(small_store):
        result = run_unprivileged(["--quiet", "study", "resume", "ro", "--storage", f"sqlite:///{small_store}",
                                   "--trials", "4", "--no-validate"])
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr, "expected a writable SQLite study store", "is read-only")
    assert sqlite_rows(small_store) == before


# --------------------------------------------------------------------------- a full disk
FSIZE_RUNNER = """
import resource, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from sparsealloc.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_mid_study_is_one_line_and_the_store_survives(small_store, tmp_path):
    """The store may not grow past its size + 16 KiB: the study stops at the first write that does
    not fit, with one line; the store is intact and ``study resume`` finishes the study."""
    url = f"sqlite:///{small_store}"
    limit = small_store.stat().st_size + 16 * 1024
    runner = tmp_path / "fsize_runner.py"
    runner.write_text(FSIZE_RUNNER, encoding="utf-8")
    result = subprocess.run([sys.executable, "-P", str(runner), str(limit), "--quiet", "study", "resume", "ro",
                             "--storage", url, "--trials", "60", "--no-validate"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    line = one_error_line(result.stderr, "the study store", "failed:", "study resume ro")
    assert "disk I/O error" in line or "full" in line or "too large" in line.lower(), line
    with sqlite3.connect(small_store) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    study = optuna.load_study(study_name="ro", storage=url)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    assert 2 <= done < 60

    code, out, err = cli(["--quiet", "study", "resume", "ro", "--storage", url, "--trials", "8", "--no-validate"])
    assert code == 0, err
    study = optuna.load_study(study_name="ro", storage=url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == max(8, done)
    assert TrialState.RUNNING not in states


def _fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)


def test_a_full_disk_during_export_keeps_the_old_plan_whole(small_store, tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{small_store}"
    out_dir = tmp_path / "out"
    assert main(["--quiet", "export", "ro", "--storage", url, "--out", str(out_dir)]) == 0
    first = (out_dir / "best.json").read_text(encoding="utf-8")
    capsys.readouterr()
    monkeypatch.setattr(Path, "write_text", _fail_with_enospc)
    code = main(["--quiet", "export", "ro", "--storage", url, "--out", str(out_dir)])
    monkeypatch.undo()
    assert code == 2
    one_error_line(capsys.readouterr().err, "expected to write the exported plans", "No space left on device")
    assert (out_dir / "best.json").read_text(encoding="utf-8") == first
    assert sorted(p.name for p in out_dir.iterdir()) == ["best.json"]  # no partial file left behind


def test_a_full_disk_during_report_is_one_line(small_store, tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{small_store}"
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _fail_with_enospc)
    code = main(["--quiet", "report", "ro", "--storage", url, "--out", str(tmp_path / "r"), "--no-model"])
    assert code == 2
    one_error_line(capsys.readouterr().err, "expected to write the report", "No space left on device")


def test_a_full_disk_while_saving_a_pruned_model_is_one_line(tiny_llama_dir, text_file, tmp_path, monkeypatch,
                                                               capsys):
    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _fail_with_enospc)
    code = main(["--quiet", "prune", "--model", str(tiny_llama_dir), "--calib-text", str(text_file),
                 "--calib-samples", "4", "--calib-seq-len", "16", "--no-eval", "--save", str(tmp_path / "m")])
    assert code == 2
    one_error_line(capsys.readouterr().err, "expected to write the pruned checkpoint", "No space left on device")


# --------------------------------------------------------------------------- the database goes away mid-study
def test_a_store_that_dies_mid_study_is_one_line_with_the_resume_command(tiny_llama_dir, text_file, tmp_path,
                                                                           monkeypatch, capsys):
    """The server closes the connection at the 4th tell: one line naming the cause and the command
    that continues; the trials told before are kept, and that command finishes the study."""
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 's.db'}"
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = []

    def dying(self, trial_id, state, values=None):
        calls.extend([state] if state == TrialState.COMPLETE else [])
        if state == TrialState.COMPLETE and len(calls) == 4:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception(
                "server closed the connection unexpectedly\n\tThis probably means the server terminated"))
        return real(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", dying)
    argv = ["--quiet", "study", "run", "--name", "dies", "--storage", url, *data_args(tiny_llama_dir, text_file),
            "--trials", "6", "--no-validate"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, f"the study store {url} failed:",
                          "server closed the connection unexpectedly",
                          f"continue with: sparsealloc study resume dies --storage {url}")
    assert "This probably means" not in line  # the driver's first line only
    monkeypatch.undo()
    study = optuna.load_study(study_name="dies", storage=url)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 3

    code, out, err = cli(["--quiet", "study", "resume", "dies", "--storage", url, "--no-validate"])
    assert code == 0, err
    study = optuna.load_study(study_name="dies", storage=url)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 6


# ----------------------------------------------------------------------------- a newcomer's first hour
def count(url: str, name: str, state: TrialState) -> int:
    study = optuna.load_study(study_name=name, storage=url)
    return len(study.get_trials(deepcopy=False, states=(state,)))


# --------------------------------------------------------------------------- 1. Ctrl-C, 2. not validated
@pytest.fixture(scope="module")
def interrupted(tiny_llama_dir, text_file, tmp_path_factory):
    """Study "ctrl c" (4 trials, --no-validate, --export): Ctrl-C in its 3rd trial, then in the 2nd
    trial of ``study resume``; then the printed command run as it is."""
    root = tmp_path_factory.mktemp("ctrl-c")
    url, name, export = f"sqlite:///{root / 's.db'}", "ctrl c", root / "out dir"
    real_submit = LocalDispatcher.submit
    submits: list[int] = []
    stop_at = [3]

    def interrupting(self, proposal, report=None):
        submits.append(proposal.trial_number)
        if len(submits) == stop_at[0]:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of a trial
        return real_submit(self, proposal, report)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalDispatcher, "submit", interrupting)
        run = cli(["--quiet", "study", "run", "--name", name, "--storage", url, *data_args(tiny_llama_dir, text_file),
                   "--trials", "4", "--no-validate", "--export", str(export)])
        after_run = (count(url, name, TrialState.COMPLETE), count(url, name, TrialState.RUNNING))
        submits.clear()
        stop_at[0] = 2
        resume = cli(["--quiet", "study", "resume", name, "--storage", url, "--no-validate", "--export", str(export)])
    line = one_error_line(resume[2])
    command = line[line.index("sparsealloc study resume"):]
    finish = cli(["--quiet", *shlex.split(command)[1:]])
    return {"url": url, "name": name, "export": export, "run": run, "after_run": after_run, "resume": resume,
            "command": command, "finish": finish}


def test_ctrl_c_says_the_trials_are_saved_and_the_command_that_finishes_the_study(interrupted):
    expected = shlex.join(["sparsealloc", "study", "resume", "ctrl c", "--storage", interrupted["url"],
                           "--no-validate", "--export", str(interrupted["export"])])
    for code, _, err in (interrupted["run"], interrupted["resume"]):
        assert code == 130
        line = one_error_line(err, "error: interrupted", "saved", expected)
        assert line.endswith(expected)
    assert interrupted["after_run"] == (2, 1)  # two trials told, the one cut off left RUNNING
    assert interrupted["command"] == expected

    code, out, err = interrupted["finish"]
    assert code == 0, err
    assert "re-queued 1 trial(s)" in out  # the trial cut off is redone
    assert count(interrupted["url"], "ctrl c", TrialState.COMPLETE) == 4
    assert (interrupted["export"] / "best.json").is_file()


def test_resume_command_quotes_the_name_and_hides_the_password():
    command = resume_command("it's mine", "postgresql+psycopg2://me:hunter2@db:5432/studies", validate=False,
                             export_dir="runs/out dir", dispatcher="ray",
                             dispatcher_options={"workers": 4, "address": "auto", "gpus_per_worker": 0.5,
                                                 "cpus_per_worker": 1.0})
    assert "hunter2" not in command
    assert shlex.split(command) == ["sparsealloc", "study", "resume", "it's mine", "--storage",
                                    "postgresql+psycopg2://me:***@db:5432/studies", "--no-validate", "--export",
                                    "runs/out dir", "--workers", "4", "--ray-address", "auto",
                                    "--gpus-per-worker", "0.5"]


def test_show_and_report_say_how_to_validate_a_study_that_was_not(interrupted, tmp_path):
    url, name = interrupted["url"], interrupted["name"]
    command = resume_command(name, url)  # no --no-validate: resume validates a finished study
    code, out, err = cli(["study", "show", name, "--storage", url])
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("validation:"))
    assert line.startswith("validation: not run") and line.endswith(f"add it with: {command}")

    code, out, err = cli(["report", name, "--storage", url, "--out", str(tmp_path / "report"), "--no-model"])
    assert code == 0, err
    note = next(line for line in out.splitlines() if "Proxy-vs-PPL" in line)
    assert "without --no-validate" not in note and f"add them with: {command}" in note

    code, out, err = cli(["--quiet", *shlex.split(command)[1:]])
    assert code == 0, err
    assert "validation (held-out perplexity)" in out
    assert count(url, name, TrialState.COMPLETE) == 4  # no new trial, only the validation
    code, out, err = cli(["study", "show", name, "--storage", url])
    assert "spearman" in out and "validation: not run" not in out


# --------------------------------------------------------------------------- 3. dashboard
@pytest.fixture
def no_server(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dashboard server was started")

    monkeypatch.setattr("sparsealloc.cli.dashboard.subprocess.Popen", refuse)


def test_dashboard_on_a_missing_sqlite_file_is_an_error_not_a_new_store(no_server, tmp_path):
    missing = tmp_path / "missing.db"
    code, out, err = cli(["dashboard", "--storage", f"sqlite:///{missing}"])
    assert code == 2
    one_error_line(err, "does not exist", "missing.db")
    assert not missing.exists() and not out


def test_dashboard_on_a_busy_port_names_it_and_suggests_another(no_server, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    open_storage(url).engine.dispose()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = cli(["dashboard", "--storage", url, "--port", str(port)])
    assert code == 2
    one_error_line(err, f"port {port}", "already in use", "--port")
    assert not out


# --------------------------------------------------------------------------- 4. | head
def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="piped", storage=open_storage(url))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "sparsealloc.cli", "study", "show", "piped",
                             "--storage", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -0` does, before the command prints
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


# --------------------------------------------------------------------------- 5. --help
def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_help_speaks_to_users_and_documents_study_run(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "Entry point" not in top and "main(argv)" not in top and "sparsity" in top

    helps = {flag: action.help or "" for action in subparser(build_parser(), "study", "run")._actions
             for flag in action.option_strings}
    defaults = StudySpec()
    shown = {"--target-sparsity": defaults.target_sparsity, "--calib-samples": defaults.calibration.samples,
             "--calib-seq-len": defaults.calibration.seq_len, "--validate-top": defaults.validation.top_k,
             "--eval-windows": defaults.validation.windows, "--eval-seq-len": defaults.validation.seq_len,
             "--population-size": defaults.population_size, "--seed": defaults.seed}
    for flag, value in shown.items():
        assert f"(default {value})" in helps[flag], (flag, helps[flag])
    assert "default" in helps["--device"]
    assert "layer_drop" in helps["--space"]
    assert "evo (EvoPress level-switch search, one objective)" in helps["--sampler"]


# --------------------------------------------------------------------------- 7. SQLite URLs
@pytest.mark.parametrize(("url", "fragment"), [
    ("sqlite:/runs/s.db", "names no existing file"),
    ("sqlite:runs.db", "names no existing file"),
    ("sqlite://runs/s.db", "'runs' reads as a host name"),
])
def test_a_sqlite_url_missing_slashes_gets_the_two_forms(url, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["study", "list"], ["study", "show", "s"], ["dashboard"]):
        code, _, err = cli([*argv, "--storage", url])
        assert code == 2
        one_error_line(err, fragment, "sqlite:///relative.db", "sqlite:////absolute.db", repr(url))
    assert not list(tmp_path.iterdir())  # nothing created


def test_a_missing_relative_sqlite_store_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["study", "list", "--storage", "sqlite:///runs/s.db"])
    assert code == 2
    one_error_line(err, "'runs/s.db' does not exist", f"relative to {Path.cwd()}", "four slashes")


# --------------------------------------------------------------------------- 2. checks before the model loads
@pytest.mark.parametrize("command", ["apply", "prune"])
def test_a_plan_naming_a_missing_module_fails_before_the_model_loads(command, tiny_llama_dir, text_file, tmp_path,
                                                                      monkeypatch):
    from sparsealloc.pruning.model.models import load_layout

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sparsealloc.pruning.model.models.load_model", no_load)
    linears = load_layout(str(tiny_llama_dir)).linears
    plan = AllocationPlan(sparsity={**{name: 0.5 for name in linears[1:]}, "model.layers.0.mlp.gate_projj": 0.5})
    path = tmp_path / "plan.json"
    plan.save(path)
    argv = [command, "--plan", str(path), "--model", str(tiny_llama_dir), "--calib-text", str(text_file),
            "--save", str(tmp_path / "out")]
    code, out, err = cli(argv)
    assert code == 2
    one_error_line(err, "gate_projj")
    # The same plan with the right names passes the check (and then loads the model).
    good = tmp_path / "good.json"
    AllocationPlan(sparsity={name: 0.5 for name in linears}).save(good)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main([command, "--plan", str(good), *argv[3:]])


# --------------------------------------------------------------------------- 4. logs outside a terminal
def test_outside_a_terminal_progress_is_plain_lines_without_cursor_codes(tiny_llama_dir, text_file, tmp_path):
    from sparsealloc.core import progress

    db = tmp_path / "s.db"
    code, out, err = cli(["study", "run", "--name", "logged", "--storage", f"sqlite:///{db}", "--trials", "10",
                          "--validate-top", "2", "--export", str(tmp_path / "export"),
                          *data_args(tiny_llama_dir, text_file)])
    assert code == 0, err
    assert progress.get_mode() == "plain"  # StringIO is not a terminal
    assert "\r" not in err and "\x1b[" not in err and "it/s" not in err, err[:500]
    lines = err.splitlines()
    trial_lines = [line for line in lines if line.startswith("trials: ")]
    assert trial_lines and trial_lines[-1].startswith("trials: 10/10 complete, best ")
    assert len(trial_lines) == len(set(trial_lines)) <= 12  # a tenth of the budget per line, each once
    assert any(line.startswith("validation: done,") for line in lines), err
    assert not any(line.startswith("evaluation:") for line in lines)  # steps inside validation stay quiet
    assert not trial_lines[-1].endswith("left")
