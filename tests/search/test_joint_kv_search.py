"""One study over per-layer sparsity, the pruning metric and per-layer KV bits (tiny Llama, NSGA-III).

Objectives (KL proxy, remaining weights, KV bytes per token): the overall sparsity is searched too,
so all three vary; the population starts from the uniform allocation at every uniform bit-width.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.core.plan import AllocationPlan
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.session import enqueue_warm_starts, open_sampler
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage import export_study, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def joint_study(fresh_model, windows_builder, tmp_path):
    model = fresh_model("llama")
    ctx = EvalContext.build(model, windows_builder(4, 16), batch_size=2, model_info={"name": "tiny-llama"})
    spec = StudySpec.from_dict({
        "name": "joint", "target_sparsity": 0.5, "space": ["layerwise", "metric", "kv"],
        "layerwise": {"granularity": "block", "radius": 0.2}, "kv": {"bits": [2, 4, 8, 16], "group_size": 8},
        "objectives": ["kl", "remaining_weights", "kv_bytes"], "sampler": "nsga3", "population_size": 8,
        "warm_start": ["uniform"], "seed": 0})
    evaluator = TrialEvaluator(ctx, spec)
    sampler = open_sampler(spec, open_storage(f"sqlite:///{tmp_path / 'joint.db'}"), evaluator.space)
    queued = enqueue_warm_starts(sampler, evaluator)
    run_study(sampler, LocalDispatcher(evaluator), 14)
    return sampler.study, queued, ctx.layout.numels, tmp_path


def test_joint_space_searches_sparsity_budget_metric_and_kv_bits(joint_study):
    study, queued, numels, tmp_path = joint_study
    assert queued == ["uniform", "uniform-kv8", "uniform-kv4", "uniform-kv2"]
    assert study.metric_names == ["kl", "remaining_weights", "kv_bytes"]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(done) == 14
    names = set(done[0].params)
    assert {"budget/sparsity", "metric/w_coef", "kv_bits/layer_00/k", "kv_bits/layer_03/v"} <= names
    assert any(n.startswith("sparsity/block_") for n in names)
    for t in done:
        # The plan asks for the searched budget exactly; the objective reports what pruning achieved
        # (whole weights per row of 64: within a fraction of a percent).
        plan = AllocationPlan.from_dict(t.user_attrs["plan"])
        requested = sum(r * numels[n] for n, r in plan.sparsity.items()) / sum(numels.values())
        assert requested == pytest.approx(t.params["budget/sparsity"], abs=1e-9)
        assert t.values[1] == pytest.approx(1 - t.user_attrs["achieved_sparsity"], abs=1e-9)
        assert t.values[1] == pytest.approx(1 - requested, abs=5e-3)
        assert plan.metric.name == "generalized" and len(plan.kv_bits) == 4
        assert plan.provenance["kv"] == {"group_size": 8, "residual": 0}
    assert len({round(t.values[1], 6) for t in done}) > 3  # remaining weights vary

    warm = {t.user_attrs["warm_start"]: t for t in done if t.user_attrs.get("warm_start")}
    assert all(t.user_attrs["generation"] == 0 for t in warm.values())
    kv_bytes = [warm[name].values[2] for name in queued]
    assert kv_bytes == sorted(kv_bytes, reverse=True) and len(set(kv_bytes)) == 4
    kl = [warm[name].values[0] for name in queued]
    assert kl[-1] > kl[0]  # 2-bit KV costs accuracy at the same sparsity

    front = study.best_trials
    for a in front:
        assert not any(all(x <= y for x, y in zip(b.values, a.values)) and b.values != a.values for b in front)
    paths = export_study(study, tmp_path / "export")
    assert len(paths) == len(front)


@pytest.mark.parametrize("budget", [{"budget": 3.0}, {"budget_bytes": None}])
def test_front_seeded_with_a_plan_and_nsga3_under_a_kv_budget(fresh_model, windows_builder, tmp_path, budget):
    """A front study queues a seed plan (e.g. a budgeted optimum) beside the uniform ladder, encoded
    exactly (per-Linear ratios and KV widths); under a KV budget every NSGA-III individual, seeds and
    offspring alike, meets it (the pymoo repair fits the widths, so what pymoo ranks was scored)."""
    model = fresh_model("llama")
    ctx = EvalContext.build(model, windows_builder(4, 16), batch_size=2, model_info={"name": "tiny-llama"})
    layout = ctx.layout
    ladder = (2, 3, 4, 8, 16)
    kv = {"bits": list(ladder), "group_size": 8}
    if budget.get("budget_bytes", 1) is None:  # the bytes of uniform 3-bit, in bytes per token
        from sparsealloc.spaces.kv_budget import slot_bytes
        kv["budget_bytes"] = 2 * len(layout.attention) * slot_bytes("k", ladder, layout.kv_heads, layout.head_dim, 8)[3]
    else:
        kv.update(budget)
    ratios = {n: (0.4 if i % 2 else 0.6) for i, n in enumerate(layout.linears)}  # mean 0.5 (equal sizes per pair)
    ratios = {n: 0.5 + (r - 0.5) * (0 if "self_attn" in n else 1) for n, r in ratios.items()}
    seed_bits = {a: {"k": 4 if i % 2 else 2, "v": 3} for i, a in enumerate(layout.attention)}
    seed = AllocationPlan(sparsity=ratios, kv_bits=seed_bits).save(tmp_path / "budgeted.json")
    spec = StudySpec.from_dict({
        "name": "front", "target_sparsity": 0.5, "space": ["layerwise", "kv"],
        "layerwise": {"granularity": "module", "radius": 0.2}, "kv": kv,
        "objectives": ["kl", "kv_bytes"], "sampler": "nsga3", "population_size": 6,
        "warm_start": ["uniform"], "seed_plans": [str(seed)], "seed": 0})
    evaluator = TrialEvaluator(ctx, spec)
    sampler = open_sampler(spec, open_storage(f"sqlite:///{tmp_path / 'front.db'}"), evaluator.space)
    queued = enqueue_warm_starts(sampler, evaluator)
    assert queued == ["uniform", "plan:budgeted"]  # no uniform-kvN under a budget: the defaults sit on it
    run_study(sampler, LocalDispatcher(evaluator), 14)
    done = sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seeded = next(t for t in done if t.user_attrs.get("warm_start") == "plan:budgeted")
    plan = AllocationPlan.from_dict(seeded.user_attrs["plan"])
    assert plan.kv_bits == seed_bits  # mean 3 bits (and uniform 3-bit's bytes): the seed fits as it is
    assert plan.sparsity == pytest.approx(ratios, abs=1e-9)
    space = evaluator.space
    for t in done:
        widths = [t.params[p] for p in space.kv_params]
        spent = sum(space.kv_cost[p][w] for p, w in zip(space.kv_params, widths)) if space.kv_cost else sum(widths)
        assert spent <= space.kv_total + 1e-6, t.number
        bits = AllocationPlan.from_dict(t.user_attrs["plan"]).kv_bits
        assert [w for b in bits.values() for w in (b["k"], b["v"])] == widths  # stored params = scored widths
    assert len({tuple(t.params[p] for p in space.kv_params) for t in done}) > 2  # the widths did move


def test_seed_plans_with_the_same_file_name_keep_one_warm_start_each():
    """Exported plans are all called best.json: each still gets its own warm start (a collision
    dropped two of the three budgeted optima seeding the first kv_front run)."""
    from sparsealloc.search.session import seed_plan_labels

    labels = seed_plan_labels(("runs/kv4/best.json", "runs/kv3/best.json", "x/front.json", "runs/kv4/best.json"))
    assert list(labels) == ["plan:kv4/best", "plan:kv3/best", "plan:front", "plan:kv4/best'"]
    assert list(labels.values()) == ["runs/kv4/best.json", "runs/kv3/best.json", "x/front.json", "runs/kv4/best.json"]
