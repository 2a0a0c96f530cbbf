"""LLaVA-style multimodal model (tiny random config): only the language model is pruned and KV-quantized.

The vision tower (CLIP, with as many layers as the language model, so only its name tells them
apart) and the multimodal projector stay untouched; calibration works text-only and image+text.
"""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.plan import AllocationPlan
from sparsealloc.objectives.kv_memory import kv_cache_bytes
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.kv.cache import packed_cache
from sparsealloc.pruning.kv.generation import cache_kwargs
from sparsealloc.pruning.kv.quant import kv_fake_quant
from sparsealloc.pruning.model.structure import model_layout

IMAGE_TOKEN = 127
IMAGE_TOKENS = 4  # (16 / 8)² patches, CLS dropped


@pytest.fixture
def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def image_text_batch(n: int = 2, seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, seq_len), generator=gen)
    ids[:, 1 : 1 + IMAGE_TOKENS] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": torch.randn(n, 3, 16, 16, generator=gen)}


def not_language(name: str) -> bool:
    return not name.startswith("model.language_model.")


def test_layout_holds_only_language_model_linears(llava):
    layout = model_layout(llava)
    assert layout.blocks_path == "model.language_model.layers"
    assert len(layout.linears) == 4 * 7 and len(layout.attention) == 4
    assert not [n for n in layout.linears + layout.attention if not_language(n)]
    vision_linears = [n for n, m in llava.named_modules() if isinstance(m, torch.nn.Linear) and not_language(n)]
    assert any("vision_tower" in n for n in vision_linears) and any("multi_modal_projector" in n for n in vision_linears)


def test_text_only_and_image_text_calibration_then_pruning(llava, windows_builder):
    layout = model_layout(llava)
    text_stats = collect_stats(llava, windows_builder(4, 12), batch_size=2, layout=layout)
    batch = image_text_batch()
    image_stats = collect_stats(llava, [batch, image_text_batch(seed=1)], layout=layout)
    assert set(text_stats) == set(image_stats) == set(layout.linears)
    first = layout.linears[0]
    assert image_stats[first].count == 2 * 2 * 12 and text_stats[first].count == 4 * 12
    # The image tokens carry the image into the language model: other pixels, other statistics.
    other_pixels = {**batch, "pixel_values": batch["pixel_values"].flip(-1)}
    a, b = (collect_stats(llava, [x], layout=layout)[first] for x in (batch, other_pixels))
    assert not torch.allclose(a.sum, b.sum)

    others = {n: p.detach().clone() for n, p in llava.named_parameters() if not_language(n)}
    with torch.no_grad():
        before = llava(**batch).logits
    prune_(llava, AllocationPlan.uniform(layout.linears, 0.5), image_stats, layout=layout)
    modules = dict(llava.named_modules())
    for name in layout.linears:
        assert (modules[name].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    for name, param in llava.named_parameters():
        if not_language(name):
            assert torch.equal(param, others[name]), name  # vision tower, projector, lm_head untouched
    with torch.no_grad():
        assert not torch.allclose(llava(**batch).logits, before)


def test_kv_quantization_reaches_only_the_language_model(llava):
    layout = model_layout(llava)
    batch = image_text_batch()
    kv_bits = {a: {"k": 2, "v": 2} for a in layout.attention}
    with torch.no_grad():
        dense = llava(**batch).logits
        features = llava.model.get_image_features(pixel_values=batch["pixel_values"])
        with kv_fake_quant(llava, kv_bits, group_size=4):
            quantized = llava(**batch).logits
            same_features = llava.model.get_image_features(pixel_values=batch["pixel_values"])
        after = llava(**batch).logits
    assert (quantized - dense).abs().max() > 1e-3 and torch.equal(after, dense)
    # The vision tower runs through the same attention function, without bits: unchanged.
    for x, y in zip(features.pooler_output, same_features.pooler_output, strict=True):
        assert torch.equal(x, y)

    cache = packed_cache(layout, {a: {"k": 4, "v": 2} for a in layout.attention}, group_size=4)
    out = llava.generate(**batch, **cache_kwargs(llava, cache), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 12 + 6) and cache.get_seq_length() == 12 + 5
    expected = kv_cache_bytes(layout.attention, {a: {"k": 4, "v": 2} for a in layout.attention}, 2, 16, 17, 4, batch=2)
    assert cache.nbytes() == expected
