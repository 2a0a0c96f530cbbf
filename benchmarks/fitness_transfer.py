"""Does any measure on the calibration text rank searched plans as the held-out texts do?

For each given plan (Wanda, ``search_quality.py``'s ``--calib-mix`` protocol): the search's fitness
(KL to the dense model per token, here in float32 over all 32 statistics windows), then KL and
next-token cross-entropy on held-out windows of the same calibration text (disjoint from the
statistics windows: :func:`~sparsealloc.pruning.calibration.text.disjoint_starts`), each split by the
text's two parts (WikiText-2 valid, the built-in Python-docs calibration topics), and the two held-out
PPLs the bars are read on (WikiText-2 test and the Python-docs evaluation topics, 20 × 512). Then
Spearman ρ of every measure with each held-out PPL, and the plan each ranks first. A measure that
ranks the plans as Python docs does would be a fitness (or a selection rule) worth searching with.

    python benchmarks/fitness_transfer.py benchmarks/*_wanda70_mix_defaults_seed[23]_epyc_wanda70_evo_plan.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from _common import (EVAL_SEQ_LEN, EVAL_WINDOWS, ROOT, Timer, from_root, load_smollm2, machine, markdown_table,
                     require_data)
from search_quality import calibration_parts, heldout_streams, protocol_evaluator


@torch.inference_mode()
def window_scores(model, windows: torch.Tensor, reference: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[list[float], list[float]]:
    """Per window: mean KL(dense ‖ model) per token (exact, from the dense ``reference`` of
    :func:`~sparsealloc.objectives.divergence.kl_reference`) and mean next-token cross-entropy."""
    from sparsealloc.objectives.context import lm_head_of
    from sparsealloc.objectives.divergence import kl_sum
    from sparsealloc.pruning.calibration.stats import decoder_trunk

    head = lm_head_of(model)
    bias = getattr(head, "bias", None)
    kls, ces = [], []
    for window, (m, c) in zip(windows, reference):
        h = decoder_trunk(model)(input_ids=window[None], use_cache=False).last_hidden_state.float()[0]
        kls.append(kl_sum(h, head.weight, bias, m, c) / h.shape[0])
        ces.append(float(sum(F.cross_entropy(head(part).float(), target, reduction="sum")
                             for part, target in zip(h[:-1].split(128), window[1:].split(128)))) / (h.shape[0] - 1))
    return kls, ces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="AllocationPlan JSON files (Wanda, the protocol's target)")
    parser.add_argument("--heldout-windows", type=int, default=48, help="held-out calibration windows × 256")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "fitness_transfer.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives.context import lm_head_of
    from sparsealloc.objectives.divergence import kl_reference
    from sparsealloc.objectives.reconstruction import forward_errors
    from sparsealloc.pruning import TextSource, perplexity, tokenize_stream
    from sparsealloc.pruning.calibration.stats import decoder_trunk
    from sparsealloc.pruning.calibration.text import disjoint_starts, window_starts, windows_at

    progress.set_mode("quiet")
    model, tokenizer, _ = load_smollm2()
    streams = heldout_streams(tokenizer)
    evaluator = protocol_evaluator(model, tokenizer)
    ctx, calibration = evaluator.ctx, evaluator.spec.calibration
    stream = tokenize_stream(tokenizer, Path(calibration.text).read_text())
    taken = window_starts(stream.numel(), calibration.samples, calibration.seq_len, calibration.seed)
    starts = disjoint_starts(stream.numel(), args.heldout_windows, calibration.seq_len, taken, calibration.seed)
    held = windows_at(stream, starts, calibration.seq_len)
    wiki_tokens = tokenize_stream(tokenizer, calibration_parts(TextSource("builtin", "calib").read())[0]).numel()
    part = pd.Series(["wiki" if s < wiki_tokens else "docs" for s in starts])  # the text is WikiText, then docs
    stats_part = {p: tuple(i for i, s in enumerate(taken) if (s < wiki_tokens) == (p == "wiki")) for p in ("wiki", "docs")}
    head = lm_head_of(model)
    with torch.inference_mode():
        reference = [kl_reference(decoder_trunk(model)(input_ids=w[None], use_cache=False).last_hidden_state[0].float(),
                                  head.weight, getattr(head, "bias", None)) for w in held]
    rows = []
    with Timer() as timer:
        for path in tqdm(args.plans, desc="fitness transfer", unit="plan", dynamic_ncols=True):
            with evaluator.applied(AllocationPlan.load(path)):
                fitness = forward_errors(ctx, ("kl",))["kl"]
                fitness_part = {p: forward_errors(ctx, ("kl",), windows=w)["kl"] for p, w in stats_part.items()}
                kls, ces = (pd.Series(v) for v in window_scores(model, held, reference))
                ppl = {k: perplexity(model, s, EVAL_SEQ_LEN, EVAL_WINDOWS) for k, s in streams.items()}
            rows.append({"plan": Path(path).name.removeprefix("search_quality_").removesuffix("_plan.json"),
                         "fitness KL (statistics windows)": fitness, "fitness KL wiki": fitness_part["wiki"],
                         "fitness KL docs": fitness_part["docs"],
                         "KL held-out": kls.mean(), "KL held-out wiki": kls[part == "wiki"].mean(),
                         "KL held-out docs": kls[part == "docs"].mean(),
                         "CE held-out": ces.mean(), "CE held-out wiki": ces[part == "wiki"].mean(),
                         "CE held-out docs": ces[part == "docs"].mean(),
                         "WikiText-2 test PPL": ppl["wikitext2-test"], "Python docs PPL": ppl["python-docs"]})
    frame = pd.DataFrame(rows)
    measures = [c for c in frame.columns if c not in ("plan", "WikiText-2 test PPL", "Python docs PPL")]
    rho = frame.drop(columns="plan").corr(method="spearman")
    ranking = pd.DataFrame([{"measure": m, "ρ with WikiText-2 test PPL": rho.loc[m, "WikiText-2 test PPL"],
                             "ρ with Python docs PPL": rho.loc[m, "Python docs PPL"],
                             "ranks first": frame.loc[frame[m].idxmin(), "plan"]}
                            for m in measures + ["WikiText-2 test PPL", "Python docs PPL"]])
    out = Path(args.out)
    out.write_text("\n".join([
        "# Calibration-side measures against the held-out PPLs (benchmarks/fitness_transfer.py)", "",
        f"Machine: {machine()}. Wanda at {evaluator.spec.target_sparsity:g}; statistics from search_quality.py's "
        f"--calib-mix pool ({calibration.samples}×{calibration.seq_len} tokens); {args.heldout_windows}×"
        f"{calibration.seq_len} held-out tokens of the same text ({(part == 'wiki').sum()} WikiText-2 valid windows, "
        f"{(part == 'docs').sum()} Python-docs calibration windows; the statistics windows: {len(stats_part['wiki'])} "
        f"and {len(stats_part['docs'])}), disjoint from them; every value measured in "
        f"this run, in float32 ({timer.seconds / 60:.1f} min).", "",
        f"Command: `python benchmarks/fitness_transfer.py {' '.join(from_root(p) for p in args.plans)}"
        f"{f' --heldout-windows {args.heldout_windows}' if args.heldout_windows != 48 else ''}`", "",
        markdown_table(frame.round(4)), "", markdown_table(ranking.round(3)), ""]))
    print(out.read_text())


if __name__ == "__main__":
    main()
