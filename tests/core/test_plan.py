"""AllocationPlan: JSON round trip, validation messages, key resolution; and the Registry."""

from __future__ import annotations

import json
import math

import pytest

from sparsealloc.core.errors import (
    DuplicateNameError,
    IncompatiblePlanError,
    SpecError,
    UnknownNameError,
)
from sparsealloc.core.plan import (
    SCHEMA_VERSION,
    AllocationPlan,
    MetricChoice,
    parse_pattern,
    weighted_mean_sparsity,
)
from sparsealloc.core.registry import Registry

LINEARS = [
    f"model.layers.{i}.{part}"
    for i in range(3)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]
BLOCKS = [f"model.layers.{i}" for i in range(3)]
ATTENTION = [f"model.layers.{i}.self_attn" for i in range(3)]


def full_plan() -> AllocationPlan:
    return AllocationPlan(
        sparsity={"model.layers.0.self_attn.q_proj": 0.5, "model.layers.1": 0.6, "*": 0.25},
        metric=MetricChoice("generalized", {"w_coef": "column_sum", "w_exponent": 0.5}),
        pattern="unstructured",
        kv_bits={"model.layers.0.self_attn": {"k": 4, "v": 8}},
        dropped_layers=("model.layers.2",),
        model={"name": "tiny", "n_layers": 3},
        provenance={"study": "demo", "trial": 17, "values": [0.12]},
    )


def valid_dict() -> dict:
    return json.loads(full_plan().to_json())


# ----------------------------------------------------------------------------- round trip
def test_json_round_trip():
    plan = full_plan()
    again = AllocationPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert again.schema_version == SCHEMA_VERSION


def test_save_load_round_trip(tmp_path):
    plan = full_plan()
    path = plan.save(tmp_path / "nested" / "plan.json")
    assert path.is_file()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert AllocationPlan.load(path) == plan


def test_saved_ratios_drop_float_noise_and_keep_the_budget(tmp_path):
    """Plan files carry 0.5275, not the budget repair's 0.5274999999756691; the weighted mean moves by
    less than 1e-10, and a ratio just below 1 stays below 1."""
    numels = {name: 1000 + 37 * i for i, name in enumerate(LINEARS)}
    noisy = {name: 0.5 + 0.01 * (i % 5) - 2.4e-11 * (i % 3) for i, name in enumerate(LINEARS)}
    noisy[LINEARS[0]] = 0.5274999999756691
    noisy[LINEARS[1]] = math.nextafter(1.0, 0.0)
    plan = AllocationPlan(sparsity=noisy)
    text = plan.save(tmp_path / "plan.json").read_text(encoding="utf-8")
    assert '"model.layers.0.self_attn.q_proj": 0.5275,' in text and "0.5274999999756691" not in text
    saved = AllocationPlan.load(tmp_path / "plan.json")
    assert saved.sparsity[LINEARS[1]] < 1.0
    assert abs(weighted_mean_sparsity(saved.sparsity, numels) - weighted_mean_sparsity(noisy, numels)) < 1e-10
    assert all(abs(saved.sparsity[n] - noisy[n]) <= 5e-11 for n in LINEARS)
    assert plan.to_dict()["sparsity"] == noisy  # only the file is rounded
    assert AllocationPlan.from_json(saved.to_json()) == saved  # rounding twice changes nothing


def test_uniform_and_replace():
    plan = AllocationPlan.uniform(LINEARS, 0.5, MetricChoice("stade", {"bias": True}), model={"n_layers": 3})
    assert set(plan.sparsity) == set(LINEARS) and set(plan.sparsity.values()) == {0.5}
    assert plan.metric.params == {"bias": True}
    other = plan.replace(pattern="2:4")
    assert other.pattern == "2:4" and plan.pattern == "unstructured"
    assert plan.replace(pattern="4:8").pattern == "4:8"  # 0.5 is 1 - 4/8 too


def test_replace_validates_again():
    plan = AllocationPlan.uniform(LINEARS, 0.5)
    with pytest.raises(SpecError, match="3:4"):
        plan.replace(pattern="3:4")


def test_metric_as_string_in_json():
    data = valid_dict()
    data["metric"] = "magnitude"
    assert AllocationPlan.from_dict(data).metric == MetricChoice("magnitude", {})


# ----------------------------------------------------------------------------- rejection
def _reject(data, *fragments):
    with pytest.raises(SpecError) as info:
        AllocationPlan.from_dict(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_schema_version():
    data = valid_dict()
    data["schema_version"] = 2
    _reject(data, "schema_version", "2")
    del data["schema_version"]
    _reject(data, "schema_version", "None")


@pytest.mark.parametrize(("ratio", "shown"), [(1.0, "1.0"), (-0.1, "-0.1"), (float("nan"), "nan"),
                                              ("0.5", "'0.5'"), (True, "True"), (None, "None")])
def test_bad_ratio(ratio, shown):
    data = valid_dict()
    data["sparsity"] = {"model.layers.0.mlp.up_proj": ratio}
    _reject(data, "model.layers.0.mlp.up_proj", shown, "[0, 1)")


def test_bad_ratio_from_json_text():
    text = json.dumps(valid_dict()).replace("0.25", "NaN")
    with pytest.raises(SpecError, match="nan"):
        AllocationPlan.from_json(text)


def test_unknown_top_level_key():
    data = valid_dict()
    data["sparsities"] = {}
    _reject(data, "unknown keys", "sparsities", "kv_bits")


@pytest.mark.parametrize("bits", [5, 0, 32, "4", True, None])
def test_bad_kv_bits(bits):
    data = valid_dict()
    data["kv_bits"] = {"model.layers.0.self_attn": {"k": bits, "v": 8}}
    _reject(data, "kv_bits", "model.layers.0.self_attn", "[2, 3, 4, 8, 16]")


def test_kv_bits_needs_k_and_v():
    data = valid_dict()
    data["kv_bits"] = {"model.layers.0.self_attn": {"k": 4}}
    _reject(data, "kv_bits", "'k'")


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "4:4", "structured", "", "2:4:8"])
def test_bad_pattern(pattern):
    data = valid_dict()
    data["pattern"] = pattern
    _reject(data, "pattern", repr(pattern))


@pytest.mark.parametrize(("pattern", "ratio"), [("2:4", 0.25), ("2:4", 0.6), ("4:8", 0.75), ("1:4", 0.5)])
def test_nm_pattern_with_wrong_ratio(pattern, ratio):
    data = valid_dict()
    data["pattern"] = pattern
    data["sparsity"] = {"model.layers.0.mlp.up_proj": ratio}
    _reject(data, pattern, "model.layers.0.mlp.up_proj", str(ratio))


@pytest.mark.parametrize(("pattern", "ratio"), [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("2:4", 0.0)])
def test_nm_pattern_with_right_ratio(pattern, ratio):
    data = valid_dict()
    data["pattern"] = pattern
    data["sparsity"] = {"model.layers.0.mlp.up_proj": ratio}
    assert AllocationPlan.from_dict(data).pattern == pattern


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    with pytest.raises(SpecError, match="N:M"):
        parse_pattern("3:3")


@pytest.mark.parametrize("text", ["[1, 2]", '"plan"', "3", "null"])
def test_non_object_json(text):
    with pytest.raises(SpecError, match="JSON object"):
        AllocationPlan.from_json(text)


def test_invalid_json_text():
    with pytest.raises(SpecError, match="valid JSON"):
        AllocationPlan.from_json('{"schema_version": 1,')


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SpecError) as info:
        AllocationPlan.load(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [("sparsity", [0.5], "'sparsity'"), ("metric", 3, "'metric'"), ("metric", {"name": 3}, "'metric'"),
     ("metric", {"name": "wanda", "params": [1]}, "params"), ("dropped_layers", "model.layers.0", "dropped_layers"),
     ("model", "tiny", "'model'"), ("dropped_layers", [1], "dropped_layers")],
)
def test_bad_field_types(key, value, fragment):
    data = valid_dict()
    data[key] = value
    _reject(data, fragment)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        AllocationPlan(sparsity={"x": 2.0})


# ----------------------------------------------------------------------------- expand / checks
def test_expand_star_block_and_exact_most_specific_wins():
    plan = AllocationPlan(sparsity={
        "*": 0.1,
        "model.layers.1": 0.6,
        "model.layers.1.mlp": 0.7,
        "model.layers.1.mlp.down_proj": 0.2,
        "model.layers.0.self_attn.q_proj": 0.5,
    })
    ratios = plan.expand(LINEARS)
    assert list(ratios) == LINEARS
    assert ratios["model.layers.0.self_attn.q_proj"] == 0.5
    assert ratios["model.layers.0.self_attn.k_proj"] == 0.1
    assert ratios["model.layers.1.self_attn.q_proj"] == 0.6
    assert ratios["model.layers.1.mlp.up_proj"] == 0.7
    assert ratios["model.layers.1.mlp.down_proj"] == 0.2
    assert ratios["model.layers.2.mlp.down_proj"] == 0.1


def test_expand_order_of_keys_does_not_matter():
    a = AllocationPlan(sparsity={"model.layers.1.mlp.down_proj": 0.2, "model.layers.1": 0.6, "*": 0.1})
    b = AllocationPlan(sparsity={"*": 0.1, "model.layers.1": 0.6, "model.layers.1.mlp.down_proj": 0.2})
    assert a.expand(LINEARS) == b.expand(LINEARS)


def test_expand_uncovered_modules_get_zero():
    ratios = AllocationPlan(sparsity={"model.layers.2": 0.4}).expand(LINEARS)
    assert all(r == 0.0 for n, r in ratios.items() if not n.startswith("model.layers.2."))
    assert all(r == 0.4 for n, r in ratios.items() if n.startswith("model.layers.2."))


def test_expand_prefix_needs_a_dot_boundary():
    names = ["model.layers.1.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    ratios = AllocationPlan(sparsity={"model.layers.1": 0.5}).expand(names)
    assert ratios == {"model.layers.1.mlp.up_proj": 0.5, "model.layers.10.mlp.up_proj": 0.0}


@pytest.mark.parametrize("key", ["model.layers.7", "model.layers.0.attn", "model.layer", "lm_head"])
def test_expand_unknown_key(key):
    with pytest.raises(IncompatiblePlanError) as info:
        AllocationPlan(sparsity={key: 0.5}).expand(LINEARS)
    assert repr(key) in str(info.value)
    assert "model.layers.0.self_attn.q_proj" in str(info.value)


def test_check_dropped():
    AllocationPlan(dropped_layers=["model.layers.1"]).check_dropped(BLOCKS)
    with pytest.raises(IncompatiblePlanError, match="model.layers.9"):
        AllocationPlan(dropped_layers=["model.layers.9"]).check_dropped(BLOCKS)
    with pytest.raises(IncompatiblePlanError, match="at least one"):
        AllocationPlan(dropped_layers=BLOCKS).check_dropped(BLOCKS)


def test_check_kv_layers():
    AllocationPlan(kv_bits={ATTENTION[1]: {"k": 2, "v": 16}}).check_kv_layers(ATTENTION)
    with pytest.raises(IncompatiblePlanError, match="model.layers.1.mlp"):
        AllocationPlan(kv_bits={"model.layers.1.mlp": {"k": 2, "v": 16}}).check_kv_layers(ATTENTION)


def test_weighted_mean_sparsity():
    assert weighted_mean_sparsity({"a": 0.5, "b": 0.0}, {"a": 300, "b": 100}) == pytest.approx(0.375)
    assert weighted_mean_sparsity({}, {}) == 0.0
    assert math.isclose(weighted_mean_sparsity({"a": 0.2}, {"a": 7, "b": 1000}), 0.2)


# ----------------------------------------------------------------------------- registry
def test_registry_register_and_get():
    reg: Registry = Registry("widget")

    @reg.register("one")
    def one():
        return 1

    assert reg.get("one") is one
    assert "one" in reg and "two" not in reg
    assert reg.names() == ["one"]


def test_registry_duplicate():
    reg: Registry = Registry("widget")
    reg.register("one")(object())
    with pytest.raises(DuplicateNameError, match="'one'"):
        reg.register("one")(object())
    with pytest.raises(DuplicateNameError):
        reg.register_lazy("one", "json:dumps")
    reg.register_lazy("two", "json:dumps")
    with pytest.raises(DuplicateNameError):
        reg.register("two")(object())


def test_registry_lazy_imports_on_first_get():
    reg: Registry = Registry("widget")
    reg.register_lazy("dumps", "json:dumps")
    reg.register_lazy("broken", "sparsealloc_no_such_module:thing")
    assert reg.names() == ["broken", "dumps"]
    assert "dumps" in reg
    assert reg.get("dumps") is json.dumps
    assert reg.get("dumps") is json.dumps
    with pytest.raises(ImportError):
        reg.get("broken")


def test_registry_unknown_name_lists_valid_names():
    reg: Registry = Registry("pruning widget")
    reg.register("beta")(1)
    reg.register("alpha")(2)
    reg.register_lazy("gamma", "json:loads")
    with pytest.raises(UnknownNameError) as info:
        reg.get("delta")
    message = str(info.value)
    assert "pruning widget" in message and "'delta'" in message
    assert "alpha, beta, gamma" in message
    assert isinstance(info.value, SpecError)
