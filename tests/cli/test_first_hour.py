"""A newcomer's first hour (issue 21): Ctrl-C names the command that finishes the study, ``study
show`` and ``report`` say how to validate, the dashboard refuses a mistyped store or a busy port,
``| head`` ends quietly, ``study run --help`` documents its flags, and SQLite URLs with missing
slashes get a hint."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.cli.main import build_parser, main
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.study import resume_command
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
