"""Exported plans as Optuna study artifacts, so optuna-dashboard lists them beside the study.

Artifacts live in a folder (Optuna's ``FileSystemArtifactStore``); the study store only keeps their
metadata. The folder defaults to one beside a SQLite file (``study.db`` → ``study-artifacts/``)
and to ``./sparsealloc-artifacts`` for server stores; ``sparsealloc export`` writes there and
``sparsealloc dashboard`` serves the same folder. Plans are uploaded at the study level: a finished
trial cannot take artifacts (Optuna raises ``UpdateFinishedTrialError``).
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta, upload_artifact
from sqlalchemy.engine import make_url

DEFAULT_SERVER_ARTIFACT_DIR = "sparsealloc-artifacts"


def default_artifact_dir(storage_url: str) -> Path:
    """``<db stem>-artifacts`` beside a SQLite file; ``./sparsealloc-artifacts`` otherwise."""
    url = make_url(storage_url)
    if url.get_backend_name() == "sqlite" and url.database:
        db = Path(url.database)
        return db.with_name(f"{db.stem}-artifacts")
    return Path(DEFAULT_SERVER_ARTIFACT_DIR)


def attach_files(study: optuna.Study, paths: list[Path], artifact_dir: str | Path) -> list[str]:
    """Upload ``paths`` as study artifacts; a file whose name and bytes are already there is skipped.

    Returns:
        The artifact ids of the files (existing ids for skipped ones).
    """
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    existing = {}
    for meta in get_all_artifact_meta(study):
        existing.setdefault(meta.filename, []).append(meta.artifact_id)
    ids = []
    for path in paths:
        path = Path(path)
        data = path.read_bytes()
        same = [a for a in existing.get(path.name, []) if _stored_bytes(artifact_dir, a) == data]
        if same:
            ids.append(same[0])
            continue
        mimetype = "application/json" if path.suffix == ".json" else None
        ids.append(upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype=mimetype))
    return ids


def _stored_bytes(artifact_dir: Path, artifact_id: str) -> bytes | None:
    file = artifact_dir / artifact_id
    return file.read_bytes() if file.is_file() else None


def fetch(artifact_dir: str | Path, artifact_id: str, to: str | Path) -> Path:
    """Copy one artifact out of the store (for tests and scripts)."""
    store = FileSystemArtifactStore(str(artifact_dir))
    download_artifact(artifact_store=store, file_path=str(to), artifact_id=artifact_id)
    return Path(to)
