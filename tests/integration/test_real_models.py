"""MiniLM, SmolLM2 and Gemma-3 from their packages: architecture, cache, embeddings, and use_topk at large k reproducing the model."""

import shutil
from pathlib import Path

import pytest
import torch

from topk_lib import load_model, use_topk
from topk_lib.hf import loading as models
from topk_lib.tasks.retrieval import embed


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


@pytest.mark.slow
def test_packaged_models_have_the_fingerprints_the_committed_sweep_records_carry(minilm, smollm2):
    import json

    from topk_lib.experiments.sweep import model_fingerprint
    from topk_lib.infra import paths

    mine = {"minilm-l6": model_fingerprint(minilm[0]), "smollm2-135m": model_fingerprint(smollm2[0])}
    for path in sorted((paths.ROOT / "data" / "results" / "accuracy").glob("*/*.json")):
        rec = json.loads(path.read_text())
        assert rec["model_fingerprint"] == mine[rec["config"]["model"]], path


# --------------------------------------------------------------------------- Gemma-3-270M (slow: first load de-quantises)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_architecture_and_cache(gemma3):
    """18 layers, 4 query heads over 1 KV head of dim 256, local (window 512) layers with every 6th global, GeGLU."""
    model, tok = gemma3
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.intermediate_size == 2048 and cfg.hidden_activation == "gelu_pytorch_tanh"  # GeGLU: gelu(gate) * up
    assert cfg.sliding_window == 512
    assert cfg.layer_types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    mlp = model.model.layers[0].mlp
    assert {n for n, _ in mlp.named_children()} >= {"gate_proj", "up_proj", "down_proj"}
    assert cfg._attn_implementation == "sdpa" and not hasattr(cfg, "quantization_config")
    parts = [models._package_file("gemma3-270m", part=i) for i in range(4)]
    assert models._cache_is_valid(models.model_cache_dir("gemma3-270m"), parts)
    assert not list(models.model_cache_dir("gemma3-270m").glob("*.gguf"))  # the assembled GGUF is not kept
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids.count(tok.bos_token_id) == 1  # BOS at the start


@pytest.mark.slow
def test_gemma3_large_k_reproduces_logits_past_the_sliding_window(gemma3):
    """600 tokens: the local layers attend within 512 keys, the global ones to all; k >= L keeps everything."""
    model, tok = gemma3
    ids = tok(PROMPT * 30, return_tensors="pt").input_ids[:, :600]  # [1, 600]
    assert ids.shape[1] == 600 > model.config.sliding_window
    with torch.no_grad():
        ref = model(ids).logits
        with use_topk(model, attn_k=ids.shape[1], ff_k=2048):  # the GeGLU probe passes on every layer
            out = model(ids).logits
        with use_topk(model, attn_k=8, ff_k=128):
            small = model(ids).logits
    assert (out - ref).abs().max() < 1e-3  # float32 over 18 layers: measured 9.2e-5 on logits of size ~44
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert (small - ref).abs().max() > 1e-2
