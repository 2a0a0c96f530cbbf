"""A finished study as tables (pandas) and a report folder: plots (PNG + HTML), ``summary.md``, ``summary.html``.

The tables are pure functions of the stored study, so they can be tested without pixels:

- :func:`trials_frame`: one row per trial (state, objective values, warm start, sparsity, seconds, PPL).
- :func:`history_frame`: best-so-far of the first objective over the trial number.
- :func:`pareto_frame`: objective values of the completed trials and whether each is Pareto-optimal.
- :func:`per_layer_frame`: per decoder block, the sparsity of the reported plan beside uniform (the
  target) and OWL (the study's ``owl`` warm start), plus the plan's K/V cache bits.
- :func:`validation_frame`: proxy value against held-out perplexity of the validated trials.

:func:`write_report` renders them (:mod:`sparsealloc.storage.figures`) into a folder.
"""

from __future__ import annotations

import base64
import html
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from sparsealloc.core.errors import StorageError
from sparsealloc.core.keys import (ACHIEVED_SPARSITY, GENERATION, PLAN, SAMPLER, SPEC_ATTR, TRIAL_SECONDS,
                                   VALIDATION, WARM_START)
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.storage.rdb import state_counts

_INDEX_RE = re.compile(r"^\d+$")


# ----------------------------------------------------------------------------------------- tables
def objective_names(study: optuna.Study) -> list[str]:
    """The stored metric names, or value_0, value_1, ..."""
    names = study.metric_names
    return list(names) if names else [f"value_{i}" for i in range(len(study.directions))]


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _minimize(study: optuna.Study, index: int = 0) -> bool:
    return study.directions[index] == optuna.study.StudyDirection.MINIMIZE


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, objectives, warm start, generation, sparsity, seconds, PPL."""
    names = objective_names(study)
    ppl = (study.user_attrs.get(VALIDATION) or {}).get("ppl", {})
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values if t.values is not None else [math.nan] * len(names)
        rows.append({"trial": t.number, "state": t.state.name.lower(), **dict(zip(names, values)),
                     "warm_start": t.user_attrs.get(WARM_START) or "", "generation": t.user_attrs.get(GENERATION),
                     "achieved_sparsity": t.user_attrs.get(ACHIEVED_SPARSITY, math.nan),
                     "trial_seconds": t.user_attrs.get(TRIAL_SECONDS, math.nan),
                     "validation_ppl": ppl.get(str(t.number), math.nan)})
    columns = ["trial", "state", *names, "warm_start", "generation", "achieved_sparsity", "trial_seconds",
               "validation_ppl"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame["generation"].isna().all():
        frame = frame.drop(columns="generation")
    return frame


def history_frame(study: optuna.Study) -> pd.DataFrame:
    """Completed trials in order: trial number, first objective, and its best value so far."""
    name = objective_names(study)[0]
    trials = sorted(completed(study), key=lambda t: t.number)
    values = pd.Series([t.values[0] for t in trials], dtype=float)
    best = values.cummin() if _minimize(study) else values.cummax()
    return pd.DataFrame({"trial": [t.number for t in trials], name: values, "best_so_far": best})


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """Completed trials' objective values with a ``pareto`` flag (Optuna's ``best_trials``)."""
    names = objective_names(study)
    front = {t.number for t in study.best_trials} if completed(study) else set()
    rows = [{"trial": t.number, **dict(zip(names, t.values)), "pareto": t.number in front,
             "warm_start": t.user_attrs.get(WARM_START) or ""} for t in completed(study)]
    return pd.DataFrame(rows, columns=["trial", *names, "pareto", "warm_start"])


def report_trial(study: optuna.Study) -> FrozenTrial:
    """The trial whose plan the report shows: the best trial, or, with several objectives, the Pareto
    trial with the best first objective (the proxy)."""
    done = [t for t in completed(study) if PLAN in t.user_attrs]
    if not done:
        raise StorageError(f"study {study.study_name!r} has no completed trial to report")
    if len(study.directions) == 1:
        return study.best_trial
    front = [t for t in study.best_trials if PLAN in t.user_attrs] or done
    pick = min if _minimize(study) else max
    return pick(front, key=lambda t: (t.values[0], t.number))


def warm_start_plan(study: optuna.Study, name: str) -> AllocationPlan | None:
    """The plan of the completed warm-start trial ``name`` (e.g. "owl"), or None."""
    for t in completed(study):
        if t.user_attrs.get(WARM_START) == name and PLAN in t.user_attrs:
            return AllocationPlan.from_dict(t.user_attrs[PLAN])
    return None


def block_index(fqn: str) -> int | None:
    """Index of the decoder block a module FQN lies in: its first all-digit component."""
    for part in fqn.split("."):
        if _INDEX_RE.match(part):
            return int(part)
    return None


def block_sparsity(plan: AllocationPlan, n_blocks: int,
                   numels: Mapping[str, int] | None = None) -> list[float]:
    """Per decoder block, the plan's sparsity.

    With ``numels`` (Linear FQN → weights, e.g. ``ModelLayout.numels``) the plan is expanded to every
    Linear and each block's ratio is parameter-weighted, as the budget is. Without it, the ratios of
    the plan's own keys in each block are averaged unweighted (``"*"`` fills blocks no key names).
    """
    out = [math.nan] * n_blocks
    if numels:
        ratios = plan.expand(list(numels))
        sums: dict[int, list[float]] = {}
        for name, ratio in ratios.items():
            b = block_index(name)
            if b is not None and b < n_blocks:
                acc = sums.setdefault(b, [0.0, 0.0])
                acc[0] += ratio * numels[name]
                acc[1] += numels[name]
        for b, (weighted, total) in sums.items():
            out[b] = weighted / total if total else math.nan
        return out
    by_block: dict[int, list[float]] = {}
    for key, ratio in plan.sparsity.items():
        b = None if key == "*" else block_index(key)
        if b is not None and b < n_blocks:
            by_block.setdefault(b, []).append(float(ratio))
    default = float(plan.sparsity["*"]) if "*" in plan.sparsity else math.nan
    for b in range(n_blocks):
        values = by_block.get(b)
        out[b] = sum(values) / len(values) if values else default
    return out


def count_blocks(plans: Sequence[AllocationPlan], numels: Mapping[str, int] | None = None) -> int:
    """Decoder blocks: from the layout's module names, else the plans' ``model.n_layers``, else the keys."""
    if numels:
        indices = [block_index(n) for n in numels]
        return max(i for i in indices if i is not None) + 1
    for plan in plans:
        if isinstance(plan.model.get("n_layers"), int):
            return int(plan.model["n_layers"])
    keys = [block_index(k) for p in plans for k in (*p.sparsity, *p.kv_bits)]
    found = [k for k in keys if k is not None]
    return max(found) + 1 if found else 0


def per_layer_frame(best: AllocationPlan, target: float | None = None, owl: AllocationPlan | None = None,
                    numels: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per decoder block (``block`` = 0..n-1): sparsity of ``best``, ``uniform`` (the target),
    ``owl`` (when given), ``dropped`` (when the plan drops blocks) and ``k_bits``/``v_bits`` (when
    the plan sets KV-cache bits; 16 = not quantized)."""
    n = count_blocks([best] + ([owl] if owl is not None else []), numels)
    frame = pd.DataFrame({"block": list(range(n)), "best": block_sparsity(best, n, numels)})
    if target is not None:
        frame["uniform"] = float(target)
    if owl is not None:
        frame["owl"] = block_sparsity(owl, n, numels)
    if best.dropped_layers:
        dropped = {block_index(name) for name in best.dropped_layers}
        frame["dropped"] = [b in dropped for b in range(n)]
    if best.kv_bits:
        k_bits, v_bits = [16] * n, [16] * n
        for key, bits in best.kv_bits.items():
            b = block_index(key)
            if b is not None and b < n:
                k_bits[b], v_bits[b] = int(bits["k"]), int(bits["v"])
        frame["k_bits"], frame["v_bits"] = k_bits, v_bits
    return frame


def validation_frame(study: optuna.Study) -> pd.DataFrame | None:
    """Validated trials: proxy (first objective) against held-out perplexity; None if not validated."""
    validation = study.user_attrs.get(VALIDATION) or {}
    ppl, proxy = validation.get("ppl") or {}, validation.get("proxy") or {}
    if not ppl:
        return None
    names = {str(t.number): t.user_attrs.get(WARM_START) or "" for t in completed(study)}
    rows = [{"trial": int(k), "proxy": proxy.get(k, math.nan), "ppl": v, "warm_start": names.get(k, "")}
            for k, v in ppl.items()]
    frame = pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)
    frame.attrs["spearman"] = validation.get("spearman")
    return frame


# ----------------------------------------------------------------------------------------- report
@dataclass
class Report:
    """What :func:`write_report` wrote, and what it left out and why."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if value is None:
        return ""
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no ``tabulate`` dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _study_facts(study: optuna.Study, trial: FrozenTrial, storage_label: str | None) -> dict[str, Any]:
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    names = objective_names(study)
    counts = state_counts(study)
    done = completed(study)
    facts: dict[str, Any] = {"study": study.study_name}
    if storage_label:
        facts["storage"] = storage_label
    facts.update({
        "model": spec.get("model", "?"),
        "target sparsity": spec.get("target_sparsity", "?"),
        "space": ",".join(spec.get("space", [])) or "?",
        "sampler": study.user_attrs.get(SAMPLER) or spec.get("sampler", "?"),
        "objectives": ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions)),
        "trials": f"{len(done)} complete of {sum(counts.values())} ("
                  + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + ")",
        "trial time": f"{sum(t.user_attrs.get(TRIAL_SECONDS, 0.0) for t in done):.1f} s in trials",
    })
    if len(study.directions) > 1:
        facts["pareto set"] = f"{len(study.best_trials)} trials"
        facts["reported plan"] = f"trial {trial.number} (Pareto trial with the best {names[0]})"
    else:
        facts["reported plan"] = f"trial {trial.number} (best {names[0]})"
    facts["reported values"] = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, trial.values))
    if trial.user_attrs.get(WARM_START):
        facts["reported values"] += f" (warm start: {trial.user_attrs[WARM_START]})"
    validation = study.user_attrs.get(VALIDATION) or {}
    ppl = (validation.get("ppl") or {}).get(str(trial.number))
    if ppl is not None:
        facts["reported plan PPL"] = f"{ppl:.4g} (held-out)"
    rho = validation.get("spearman")
    if validation:
        facts["spearman(proxy, PPL)"] = f"{rho:.3f}" if rho is not None else "too few validated trials"
    return facts


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" style="max-width:100%">'


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f4f4f4}.facts td{text-align:left}h2{margin-top:1.6em}.note{color:#a15c00}")


def _html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _frame_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.6g}", na_rep="", border=0)


def _validation_hint(study: optuna.Study, spec: Mapping[str, Any], storage_label: str | None) -> str:
    """How to add held-out perplexities to a study that has none (``study resume`` validates)."""
    if not spec:
        return "it was not made by sparsealloc study run"
    if (spec.get("validation") or {}).get("top_k") == 0:
        return "its spec sets validation top_k: 0"
    command = shlex.join(["sparsealloc", "study", "resume", study.study_name, "--storage", storage_label or "URL"])
    return f"add them with: {command}, then run the report again"


def write_report(study: optuna.Study, out_dir: str | Path, numels: Mapping[str, int] | None = None,
                 storage_label: str | None = None, top: int = 10) -> Report:
    """Write plots (``NAME.png`` + self-contained ``NAME.html``), ``summary.md`` and ``summary.html``.

    Args:
        study: A sparsealloc study with at least one completed trial.
        out_dir: Output folder (created).
        numels: Linear FQN → weights of the study's model, to weight per-block sparsity by parameters
            (without it, per-block ratios are unweighted means of the plan's keys; noted in the report).
        storage_label: How to name the store in the summary (no password).
        top: Rows of the best-trials table (single objective).

    Raises:
        StorageError: no completed trial with a plan.
    """
    from sparsealloc.storage import figures

    out_dir = Path(out_dir)
    trial = report_trial(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir)
    names = objective_names(study)
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    best_plan = AllocationPlan.from_dict(trial.user_attrs[PLAN])
    owl = warm_start_plan(study, "owl")
    if owl is None:
        report.notes.append("OWL line left out: the study has no completed 'owl' warm-start trial.")
    if not numels:
        report.notes.append("Per-block sparsity is the unweighted mean of the plan's per-module ratios "
                            "(the model's layout was not available to weight them by parameters).")
    target = spec.get("target_sparsity")
    layers = per_layer_frame(best_plan, target, owl, numels)
    history = history_frame(study)
    trials = trials_frame(study)
    validation = validation_frame(study)
    report.facts = _study_facts(study, trial, storage_label)

    done = trials[trials.state == "complete"]
    if len(study.directions) == 1:
        best_rows = done.sort_values(names[0], ascending=_minimize(study)).head(top)
        best_title = f"Best {len(best_rows)} trials by {names[0]}"
    else:
        front = {t.number for t in study.best_trials}
        best_rows = done[done.trial.isin(front)].sort_values(names[0])
        best_title = f"Pareto set ({len(best_rows)} trials)"
    best_rows = best_rows.dropna(axis=1, how="all")
    report.tables = {"best": best_rows, "per_layer": layers, "history": history, "trials": trials}

    # figures: (file stem, title, figure, data table)
    plots: list[tuple[str, str, Any, pd.DataFrame]] = [
        ("history", "Optimization history", figures.history_figure(history, names[0]), history)]
    if len(names) >= 2:
        pareto = pareto_frame(study)
        report.tables["pareto"] = pareto
        plots.append(("pareto", "Pareto front" + (" (projection)" if len(names) > 2 else ""),
                      figures.pareto_figure(pareto, names), pareto))
        if len(names) == 3:
            plots.append(("pareto_3d", "Pareto front (3D)", figures.pareto_3d_figure(pareto, names), pareto))
    plots.append(("per_layer_sparsity", "Per-layer sparsity",
                  figures.per_layer_figure(layers, trial.number), layers))
    if "k_bits" in layers:
        plots.append(("kv_bits", "KV-cache bits per layer", figures.kv_bits_figure(layers, trial.number), layers))
    else:
        report.notes.append("KV-bits plot left out: the reported plan sets no KV-cache bits.")
    if validation is not None and len(validation):
        report.tables["validation"] = validation
        plots.append(("proxy_vs_ppl", "Proxy vs validation perplexity",
                      figures.validation_figure(validation, names[0]), validation))
    else:
        report.notes.append(f"Proxy-vs-PPL plot left out: the study holds no validation results "
                            f"({_validation_hint(study, spec, storage_label)}).")

    images: list[tuple[str, str, Path]] = []
    for stem, title, fig, table in plots:
        png = figures.save_png(fig, out_dir / f"{stem}.png")
        page = out_dir / f"{stem}.html"
        page.write_text(_html_page(f"{study.study_name}: {title}",
                                   f"<h1>{html.escape(title)}</h1>\n{_img_tag(png, title)}\n"
                                   f"<h2>Data</h2>\n{_frame_html(table)}"), encoding="utf-8")
        report.files += [png, page]
        images.append((stem, title, png))

    # summary.md
    lines = [f"# Study report: {study.study_name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.facts.items()]
    lines += ["", f"## {best_title}", "", markdown_table(best_rows), "",
              f"## Per-layer allocation of trial {trial.number}", "", markdown_table(layers), ""]
    if validation is not None and len(validation):
        lines += ["## Validation (held-out perplexity)", "", markdown_table(validation), ""]
    lines += ["## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({stem}.png) ([HTML]({stem}.html))\n" for stem, title, _ in images]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    summary_md = out_dir / "summary.md"
    summary_md.write_text("\n".join(lines), encoding="utf-8")

    # summary.html (self-contained: PNGs embedded as base64)
    facts = pd.DataFrame({"": list(report.facts), "value": [str(v) for v in report.facts.values()]})
    body = [f"<h1>Study report: {html.escape(study.study_name)}</h1>",
            facts.to_html(index=False, header=False, border=0, classes="facts"),
            f"<h2>{html.escape(best_title)}</h2>", _frame_html(best_rows),
            f"<h2>Per-layer allocation of trial {trial.number}</h2>", _frame_html(layers)]
    if validation is not None and len(validation):
        body += ["<h2>Validation (held-out perplexity)</h2>", _frame_html(validation)]
    for stem, title, png in images:
        body += [f"<h2>{html.escape(title)}</h2>", _img_tag(png, title)]
    if report.notes:
        body += ["<h2>Notes</h2>", "<ul>"] + [f'<li class="note">{html.escape(n)}</li>' for n in report.notes]
        body += ["</ul>"]
    summary_html = out_dir / "summary.html"
    summary_html.write_text(_html_page(f"Study report: {study.study_name}", "\n".join(body)), encoding="utf-8")
    report.files += [summary_md, summary_html]
    return report
