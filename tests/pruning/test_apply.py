"""prune_ on tiny Llama / Mistral / Qwen2 / OPT models: sparsity, patterns, bias compensation, save."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sparsealloc.core.errors import IncompatiblePlanError, SpecError, UnknownNameError
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.apply import prune_, resolve_plan, save_pruned
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.model.structure import model_layout

ARCHS = ["llama", "mistral", "qwen2", "opt"]
PROBE = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 120, 64, 31, 9, 11]])


@pytest.fixture(scope="module")
def stats_of(tiny_models, tiny_calib):
    """arch → calibration statistics of the pristine tiny model."""
    return {arch: collect_stats(model, tiny_calib) for arch, model in tiny_models.items()}


def logits(model, ids=PROBE, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def weights(model, layout):
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() for name in layout.linears}


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("arch", ARCHS)
def test_layout(tiny_models, arch):
    layout = model_layout(tiny_models[arch])
    per_block = 6 if arch == "opt" else 7
    assert len(layout.blocks) == 4
    assert len(layout.linears) == 4 * per_block
    assert len(layout.attention) == 4 and all(a.endswith("self_attn") for a in layout.attention)
    assert "lm_head" not in layout.linears
    assert all(layout.block_of[n] in layout.blocks for n in layout.linears)
    assert all(d % 8 == 0 for d in layout.in_features.values())


# ----------------------------------------------------------------------------- sparsity
def _check_sparsity(model, layout, plan, report):
    requested = plan.expand(layout.linears)
    numels = layout.numels
    assert report.requested == requested
    total_zero = 0
    for name, w in weights(model, layout).items():
        zeros = int((w == 0).sum())
        total_zero += zeros
        assert abs(zeros - requested[name] * numels[name]) <= 1, name
        assert report.achieved[name] == zeros / numels[name]
    want = sum(requested[n] * numels[n] for n in layout.linears) / layout.total_params
    assert abs(total_zero / layout.total_params - want) < 1e-3
    assert abs(report.achieved_mean - report.requested_mean) < 1e-3
    assert report.requested_mean == pytest.approx(want)


@pytest.mark.parametrize("metric", ["wanda", "magnitude", "stade", "ria", "lognorm", "generalized"])
@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_half(fresh_model, stats_of, arch, metric):
    model = fresh_model(arch)
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice(metric))
    report = prune_(model, plan, stats_of[arch], layout=layout)
    _check_sparsity(model, layout, plan, report)
    assert report.achieved_mean == pytest.approx(0.5, abs=1e-3)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_random_per_module_plan(fresh_model, stats_of, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    gen = torch.Generator().manual_seed(7)
    ratios = (torch.rand(len(layout.linears), generator=gen) * 0.95).tolist()
    ratios[0] = 0.0
    plan = AllocationPlan(sparsity=dict(zip(layout.linears, ratios)))
    report = prune_(model, plan, stats_of[arch], layout=layout)
    _check_sparsity(model, layout, plan, report)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_shorthand_plan(fresh_model, stats_of, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    plan = AllocationPlan(sparsity={"*": 0.3, layout.blocks[2]: 0.7, layout.linears[0]: 0.1})
    report = prune_(model, plan, stats_of[arch], layout=layout)
    _check_sparsity(model, layout, plan, report)
    assert report.requested[layout.linears[0]] == 0.1
    assert report.requested[layout.block_linears(layout.blocks[2])[0]] == 0.7


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("arch", ARCHS)
def test_nm_patterns(fresh_model, stats_of, arch, pattern, n, m):
    model = fresh_model(arch)
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 1 - n / m, pattern=pattern)
    prune_(model, plan, stats_of[arch], layout=layout)
    for name, w in weights(model, layout).items():
        groups = (w == 0).reshape(w.shape[0], -1, m)
        assert (groups.sum(dim=2) == m - n).all(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_all_zero_plan_changes_nothing(fresh_model, tiny_models, stats_of, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    before = logits(tiny_models[arch])
    report = prune_(model, AllocationPlan.uniform(layout.linears, 0.0), stats_of[arch], layout=layout)
    assert torch.equal(logits(model), before)
    assert report.achieved_mean == 0.0
    empty = prune_(model, AllocationPlan(), stats_of[arch])
    assert torch.equal(logits(model), before) and empty.requested_mean == 0.0


def test_pruning_changes_logits(fresh_model, tiny_models, stats_of):
    model = fresh_model("llama")
    prune_(model, AllocationPlan.uniform(model_layout(model).linears, 0.5), stats_of["llama"])
    assert not torch.equal(logits(model), logits(tiny_models["llama"]))


def test_wanda_prunes_lowest_scores(fresh_model, tiny_models, stats_of):
    model = fresh_model("llama")
    name = "model.layers.1.mlp.down_proj"
    original = dict(tiny_models["llama"].named_modules())[name].weight.detach()
    prune_(model, AllocationPlan(sparsity={name: 0.5}), stats_of["llama"])
    pruned = dict(model.named_modules())[name].weight.detach() == 0
    score = original.abs() * stats_of["llama"][name].norm
    for row in range(original.shape[0]):
        assert score[row][pruned[row]].max() <= score[row][~pruned[row]].min()


def test_magnitude_needs_no_stats_but_wanda_does(fresh_model):
    model = fresh_model("llama")
    layout = model_layout(model)
    report = prune_(model, AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("magnitude")), None)
    assert report.achieved_mean == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(SpecError, match="calibration statistics"):
        prune_(fresh_model("llama"), AllocationPlan.uniform(layout.linears, 0.5), None)


# ----------------------------------------------------------------------------- STADE mean compensation
class _OneLayer(nn.Module):
    """A minimal "decoder" with one block holding one Linear (what model_layout needs)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": linear})])

    @property
    def proj(self) -> nn.Linear:
        return self.layers[0]["proj"]


def test_stade_bias_compensates_non_zero_mean_inputs():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    x = torch.randn(512, 32, generator=gen) * 0.5 + torch.randn(32, generator=gen) * 3  # non-zero mean
    stats = {"layers.0.proj": LayerStats((x * x).sum(0), x.sum(0), x.shape[0])}
    dense = x @ weight.T

    errors = {}
    for bias in (False, True):
        model = _OneLayer(weight)
        report = prune_(model, AllocationPlan(sparsity={"layers.0.proj": 0.5},
                                              metric=MetricChoice("stade", {"bias": bias})), stats)
        with torch.no_grad():
            errors[bias] = (model.proj(x) - dense).pow(2).mean().item()
        if bias:
            assert report.biased == ["layers.0.proj"]
            b = model.proj.bias.detach()
            assert b.abs().sum() > 0
            pruned = model.proj.weight.detach() == 0
            torch.testing.assert_close(b, (weight * pruned) @ x.mean(0), rtol=1e-4, atol=1e-4)
        else:
            assert model.proj.bias is None and report.biased == []
    assert errors[True] < 0.5 * errors[False]


def test_stade_bias_on_llama_adds_biases(fresh_model, stats_of):
    model = fresh_model("llama")
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("stade", {"bias": True}))
    report = prune_(model, plan, stats_of["llama"], layout=layout)
    modules = dict(model.named_modules())
    assert sorted(report.biased) == sorted(layout.linears)
    assert all(modules[n].bias is not None and modules[n].bias.abs().sum() > 0 for n in layout.linears)


# ----------------------------------------------------------------------------- save → reload
def _reload(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _assert_same_model(model, reloaded):
    diff = (logits(model) - logits(reloaded)).abs().max().item()
    assert diff < 1e-6, diff
    layout = model_layout(model)
    for (name, w), (_, w2) in zip(weights(model, layout).items(), weights(reloaded, layout).items()):
        assert torch.equal(w == 0, w2 == 0), name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload(fresh_model, stats_of, tiny_tokenizer, tmp_path, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 0.5, model={"n_layers": 4})
    prune_(model, plan, stats_of[arch], layout=layout)
    out = save_pruned(model, tiny_tokenizer, tmp_path / "out", plan)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert AllocationPlan.load(out / "plan.json") == plan
    reloaded = _reload(out)
    _assert_same_model(model, reloaded)
    zeros = sum(int((w == 0).sum()) for w in weights(reloaded, layout).values())
    assert zeros / layout.total_params == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("partial", [False, True])
def test_save_llama_with_stade_bias(fresh_model, stats_of, tmp_path, partial):
    model = fresh_model("llama")
    layout = model_layout(model)
    names = [n for n in layout.linears if ".self_attn.q_proj" in n or ".mlp.down_proj" in n] if partial \
        else list(layout.linears)
    plan = AllocationPlan.uniform(names, 0.5, MetricChoice("stade", {"bias": True}))
    prune_(model, plan, stats_of["llama"], layout=layout)
    save_pruned(model, None, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    reloaded = _reload(tmp_path / "out")
    modules = dict(reloaded.named_modules())
    assert all(modules[n].bias is not None for n in layout.linears)
    _assert_same_model(model, reloaded)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_save_refuses_biases_the_config_cannot_hold(fresh_model, stats_of, tmp_path, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    prune_(model, AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("stade", {"bias": True})),
           stats_of[arch], layout=layout)
    with pytest.raises(SpecError, match="bias"):
        save_pruned(model, None, tmp_path / "out")


def test_save_opt_with_stade_bias(fresh_model, stats_of, tmp_path):
    model = fresh_model("opt")  # OPT has biases everywhere already
    layout = model_layout(model)
    prune_(model, AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("stade", {"bias": True})),
           stats_of["opt"], layout=layout)
    save_pruned(model, None, tmp_path / "out")
    _assert_same_model(model, _reload(tmp_path / "out"))


# ----------------------------------------------------------------------------- dropped layers
@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_layers(fresh_model, stats_of, tmp_path, arch):
    model = fresh_model(arch)
    layout = model_layout(model)
    plan = AllocationPlan(sparsity={"*": 0.5}, dropped_layers=[layout.blocks[1], layout.blocks[3]])
    report = prune_(model, plan, stats_of[arch], layout=layout)
    assert report.dropped_blocks == [1, 3]
    after = model_layout(model)
    assert len(after.blocks) == 2 and model.config.num_hidden_layers == 2
    assert len(after.linears) == len(layout.linears) // 2
    for i, block in enumerate(model.get_submodule(after.blocks_path)):
        attn = block.self_attn
        assert getattr(attn, "layer_idx", i) == i
    out = logits(model, use_cache=True)
    assert out.shape == (1, PROBE.shape[1], 128) and torch.isfinite(out).all()
    generated = model.generate(PROBE, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, PROBE.shape[1] + 4)
    save_pruned(model, None, tmp_path / "out")
    _assert_same_model(model, _reload(tmp_path / "out"))


# ----------------------------------------------------------------------------- plan mismatch
def test_unknown_module_in_plan(fresh_model, stats_of):
    model = fresh_model("llama")
    with pytest.raises(IncompatiblePlanError, match="model.layers.0.mlp.nope"):
        prune_(model, AllocationPlan(sparsity={"model.layers.0.mlp.nope": 0.5}), stats_of["llama"])
    with pytest.raises(IncompatiblePlanError, match="model.layers.9"):
        prune_(model, AllocationPlan(sparsity={"model.layers.9": 0.5}), stats_of["llama"])


def test_plan_for_another_layer_count(fresh_model, stats_of):
    model = fresh_model("llama")
    plan = AllocationPlan(sparsity={"*": 0.5}, model={"n_layers": 30})
    with pytest.raises(IncompatiblePlanError, match="30 layers"):
        prune_(model, plan, stats_of["llama"])
    assert all((w != 0).all() for w in weights(model, model_layout(model)).values())


def test_resolve_plan_checks_names(tiny_llama):
    layout = model_layout(tiny_llama)
    with pytest.raises(UnknownNameError, match="wanda"):
        resolve_plan(AllocationPlan(metric=MetricChoice("wandda")), layout)
    with pytest.raises(SpecError, match="alpha"):
        resolve_plan(AllocationPlan(metric=MetricChoice("wanda", {"alpha": 1})), layout)
    with pytest.raises(IncompatiblePlanError, match="drops"):
        resolve_plan(AllocationPlan(dropped_layers=["model.layers.4"]), layout)
    with pytest.raises(IncompatiblePlanError, match="kv_bits"):
        resolve_plan(AllocationPlan(kv_bits={"model.layers.0.mlp": {"k": 4, "v": 4}}), layout)
    ok = AllocationPlan(sparsity={"model.layers.0": 0.5}, kv_bits={"model.layers.0.self_attn": {"k": 4, "v": 8}})
    ratios = resolve_plan(ok, layout)
    assert sum(r > 0 for r in ratios.values()) == 7
