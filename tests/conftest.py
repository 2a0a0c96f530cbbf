"""Shared fixtures: tiny random decoder-only models, seeded token windows, a tiny on-disk checkpoint,
model-free layouts.

Every model here is built offline from a config (nothing is downloaded). Widths are multiples of 8
so that 2:4 and 4:8 patterns apply to every Linear layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 96
N_LAYERS = 4
N_HEADS = 4
N_KV_HEADS = 2
ARCHS = ("llama", "mistral", "qwen2", "opt")

CORPUS = (
    "the quick brown fox jumps over the lazy dog .\n"
    "a sparse model keeps the weights that matter and drops the rest .\n"
    "pruning removes weights ; calibration measures the inputs of every layer .\n"
    "the dog sleeps while the fox runs over the hill and the model learns .\n"
    "every layer has a weight matrix and every weight has a score .\n"
    "small models run fast on a cpu and large models need a gpu .\n"
)


def tiny_config(arch: str, **overrides):
    """Config of a tiny random model of ``arch`` ("llama", "mistral", "qwen2" or "opt")."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if arch == "opt":
        kwargs = dict(common, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, word_embed_proj_dim=HIDDEN, dropout=0.0,
                      attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
        kwargs.update(overrides)
        return OPTConfig(**kwargs)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    kwargs = dict(common, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                  num_key_value_heads=N_KV_HEADS, attention_dropout=0.0)
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(arch: str, seed: int = 0, **overrides):
    """A tiny random causal LM of ``arch`` in eval mode, float32, on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


def build_tokenizer():
    """A small word-level tokenizer trained offline on :data:`CORPUS` (vocab < 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def fake_layout(n_blocks: int = 6, sizes: Mapping[str, int] | None = None,
                growth: Callable[[int], int] = lambda i: 1) -> SimpleNamespace:
    """A LayoutLike without a model (search spaces and samplers need only names and sizes).

    Args:
        n_blocks: Decoder blocks ``model.layers.{i}``, each with an attention module ``.self_attn``.
        sizes: Linear suffix → weights, per block, in this order (default: a small q_proj and a
            larger down_proj).
        growth: Factor on the sizes of block ``i`` (default 1: every block alike).
    """
    sizes = sizes or {"self_attn.q_proj": 4096, "mlp.down_proj": 11008}
    blocks = [f"model.layers.{i}" for i in range(n_blocks)]
    numels = {f"{b}.{kind}": size * growth(i) for i, b in enumerate(blocks) for kind, size in sizes.items()}
    return SimpleNamespace(blocks=blocks, linears=list(numels), block_of={n: n.rsplit(".", 2)[0] for n in numels},
                           numels=numels, attention=[f"{b}.self_attn" for b in blocks], kv_heads=3, head_dim=64)


def random_windows(n: int = 6, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids, shape (n, seq_len)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=gen)


@pytest.fixture(scope="session")
def tiny_models():
    """arch → a pristine tiny model; tests that mutate must take a copy (see ``fresh_model``)."""
    return {arch: build_tiny_model(arch) for arch in ARCHS}


@pytest.fixture
def fresh_model(tiny_models):
    """Factory: a deep copy of the session's tiny model of ``arch`` (safe to prune in place)."""

    def make(arch: str):
        return copy.deepcopy(tiny_models[arch])

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_mistral(tiny_models):
    return tiny_models["mistral"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models):
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def tiny_opt(tiny_models):
    return tiny_models["opt"]


@pytest.fixture(scope="session")
def tiny_calib() -> torch.Tensor:
    """Seeded random calibration windows, shape (6, 16)."""
    return random_windows(6, 16, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A text file of a few hundred in-vocabulary words (calibration and evaluation text)."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS * 8, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """A SQLite study store shared by the tests of one module (each uses its own study names)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'studies.db'}"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama, tiny_tokenizer) -> Path:
    """A tiny Llama checkpoint plus tokenizer saved to disk (loadable by ``load_model`` / the CLI)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


# With --import-mode=importlib test modules cannot import conftest; they get the builders as fixtures.
@pytest.fixture(scope="session")
def model_builder():
    """:func:`build_tiny_model` (arch, seed=0, **config overrides) → fresh tiny model."""
    return build_tiny_model


@pytest.fixture(scope="session")
def layout_builder():
    """:func:`fake_layout` (n_blocks, sizes, growth) → a model-free layout."""
    return fake_layout


@pytest.fixture(scope="session")
def windows_builder():
    """:func:`random_windows` (n, seq_len, seed) → seeded token ids."""
    return random_windows
