"""The study store (Optuna RDB by URL) and exports of plans."""

from sparsealloc.storage.export import export_study, plan_of
from sparsealloc.storage.rdb import DEFAULT_STORAGE, create_or_load_study, load_study, open_storage, recover_orphans

__all__ = ["DEFAULT_STORAGE", "create_or_load_study", "export_study", "load_study", "open_storage", "plan_of", "recover_orphans"]
