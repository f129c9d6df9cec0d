"""Tiny model generation: deterministic bytes, growing tiers, complete HF folders, GGUF tokenizer metadata."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recserve.tools.models import HF_FILES, TIERS, TIERS_SIZES, TinyModelPaths, make_tiny_models
from tests.conftest import install_hint

gguf = pytest.importorskip("gguf", reason=install_hint("models"))
load_file = pytest.importorskip("safetensors.numpy", reason=install_hint("models")).load_file
Tokenizer = pytest.importorskip("tokenizers", reason=install_hint("models")).Tokenizer


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModelPaths]:
    return make_tiny_models(tmp_path_factory.mktemp("models"), seed=0)


def _root(models: dict[str, TinyModelPaths]) -> Path:
    return models["device"].gguf.parent.parent


def test_same_seed_gives_identical_bytes_across_processes(
    models: dict[str, TinyModelPaths],
    tmp_path: Path,
) -> None:
    # Another process: tokenizers' Rust hash maps are seeded per process, so this catches ordering drift.
    code = "import sys, pathlib, recserve.tools.models as m; m.make_tiny_models(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True)
    first, second = _files(_root(models)), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert len(first) == 3 * (len(HF_FILES) + 1) + 1
    assert [name for name in first if first[name] != second[name]] == []


def test_other_seed_gives_other_weights(models: dict[str, TinyModelPaths], tmp_path: Path) -> None:
    other = make_tiny_models(tmp_path / "seed1", seed=1)
    for tier in TIERS:
        assert other[tier].gguf.read_bytes() != models[tier].gguf.read_bytes()
        a = load_file(str(models[tier].hf_dir / "model.safetensors"))
        b = load_file(str(other[tier].hf_dir / "model.safetensors"))
        assert not np.array_equal(
            a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
        )
        # The tokenizer does not depend on the seed, so tiers of any seed share one vocabulary.
        assert (other[tier].hf_dir / "tokenizer.json").read_bytes() == (
            models[tier].hf_dir / "tokenizer.json"
        ).read_bytes()


def test_tiers_grow_device_edge_cloud(models: dict[str, TinyModelPaths]) -> None:
    params = []
    for tier in TIERS:
        tensors = load_file(str(models[tier].hf_dir / "model.safetensors"))
        count = sum(t.size for t in tensors.values())
        vocab = tensors["lm_head.weight"].shape[0]
        assert count == TIERS_SIZES[tier].parameter_count(vocab)
        params.append(count)
    sizes = [models[tier].gguf.stat().st_size for tier in TIERS]
    assert params[0] < params[1] < params[2]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] < 60_000_000  # small enough for CI


def test_existing_models_with_the_same_seed_are_reused(tmp_path: Path) -> None:
    paths = make_tiny_models(tmp_path, seed=3)
    stamp = paths["cloud"].gguf.stat().st_mtime_ns
    assert make_tiny_models(tmp_path, seed=3) == paths
    assert paths["cloud"].gguf.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 3
    # Another seed, or a missing file, means regeneration.
    before = paths["cloud"].gguf.read_bytes()
    make_tiny_models(tmp_path, seed=4)
    assert paths["cloud"].gguf.read_bytes() != before
    (paths["edge"].hf_dir / "tokenizer.json").unlink()
    make_tiny_models(tmp_path, seed=4)
    assert (paths["edge"].hf_dir / "tokenizer.json").is_file()


def test_hf_folder_is_complete_and_consistent(models: dict[str, TinyModelPaths]) -> None:
    for tier in TIERS:
        folder = models[tier].hf_dir
        assert sorted(p.name for p in folder.iterdir()) == sorted(HF_FILES)
        config = json.loads((folder / "config.json").read_text())
        size = TIERS_SIZES[tier]
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (config["hidden_size"], config["num_hidden_layers"]) == (size.hidden, size.layers)
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (size.heads, size.kv_heads)
        tensors = load_file(str(folder / "model.safetensors"))
        assert tensors["model.embed_tokens.weight"].shape == (config["vocab_size"], size.hidden)
        assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (
            size.kv_heads * size.head_dim,
            size.hidden,
        )
        assert all(t.dtype == np.float32 for t in tensors.values())
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "messages" in tok_config["chat_template"]
        assert tok_config["bos_token"] == "<s>"
        assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["bos_token_id"], generation["eos_token_id"]) == (
            config["bos_token_id"],
            config["eos_token_id"],
        )


def test_every_model_file_is_readable_by_other_users(models: dict[str, TinyModelPaths]) -> None:
    """The containers mount the models read-only and run as a non-root user who owns none of the files."""
    for tier in TIERS:
        for path in [models[tier].gguf, *models[tier].hf_dir.iterdir()]:
            assert path.stat().st_mode & 0o004, f"{path.name} of {tier} is not readable by others"


def test_tokenizer_is_printable_ascii_with_special_tokens(models: dict[str, TinyModelPaths]) -> None:
    tokenizer = Tokenizer.from_file(str(models["device"].hf_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    assert [vocab["<s>"], vocab["</s>"], vocab["<pad>"]] == [0, 1, 2]
    allowed = set(string.printable) - set("\t\r\x0b\x0c")
    for token_id in range(3, tokenizer.get_vocab_size()):
        assert set(tokenizer.decode([token_id])) <= allowed, token_id
    encoded = tokenizer.encode("The answer is A, B, C or D. 42")
    assert encoded.ids[0] == 0  # BOS added, as llama.cpp does
    assert tokenizer.decode(encoded.ids, skip_special_tokens=True) == "The answer is A, B, C or D. 42"
    for letter in "ABCD":
        assert len(tokenizer.encode(letter, add_special_tokens=False).ids) == 1


def test_gguf_has_llama_metadata_and_gpt2_tokenizer(models: dict[str, TinyModelPaths]) -> None:
    hf_tokens = Tokenizer.from_file(str(models["cloud"].hf_dir / "tokenizer.json")).get_vocab()
    reader = gguf.GGUFReader(str(models["cloud"].gguf))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    size = TIERS_SIZES["cloud"]
    assert fields["general.architecture"] == "llama"
    assert fields["llama.embedding_length"] == size.hidden
    assert fields["llama.block_count"] == size.layers
    assert fields["llama.attention.head_count_kv"] == size.kv_heads
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert {t: i for i, t in enumerate(tokens)} == hf_tokens
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert len(fields["tokenizer.ggml.merges"]) > 100
    assert all(len(m.split(" ")) == 2 for m in fields["tokenizer.ggml.merges"])
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert "messages" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        f"blk.{size.layers - 1}.ffn_down.weight",
    } <= names
    assert len(names) == 3 + 9 * size.layers
