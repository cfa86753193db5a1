"""The analysis notebooks run, through the runner, on models that are not the suite's own.

A tiny randomly initialised Qwen2 decoder (two layers attending to everything, two within a
sliding window) and a tiny BERT encoder are saved to local directories with real tokenizers
(no hub); notebooks 01, 02, 03 and 06 run on them in quick mode, with the models given as
``-p`` values, and write their figures under the models' names.
"""

import pytest
import torch
from transformers import BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM

from tests.tiny_models import bert_tokenizer
from topk_lib import load_model
from topk_lib.experiments.choices import model_shape
from topk_lib.infra import runner

WINDOW = 64  # shorter than the quick inputs (128 tokens and more), so two layers really slide


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _, tokenizer = load_model("smollm2-135m")  # a real tokenizer with a chat template, from the offline cache
    torch.manual_seed(0)
    decoder = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    decoder.save_pretrained(root / "tiny-qwen2")
    tokenizer.save_pretrained(root / "tiny-qwen2")
    encoder_tokenizer = bert_tokenizer()
    encoder = BertModel(BertConfig(vocab_size=encoder_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512))
    encoder.save_pretrained(root / "tiny-bert")
    encoder_tokenizer.save_pretrained(root / "tiny-bert")
    return root / "tiny-qwen2", root / "tiny-bert"


def test_the_tiny_decoder_has_sliding_and_full_layers(model_dirs):
    model, _ = load_model(str(model_dirs[0]))
    shape = model_shape(model)
    assert shape.windows == {2: WINDOW, 3: WINDOW} and shape.full_layers(128) == [1]


@pytest.mark.timeout(900)
def test_notebooks_run_on_local_models(model_dirs, tmp_path, monkeypatch, capsys):
    decoder, encoder = (str(d) for d in model_dirs)
    monkeypatch.setattr(runner, "BUILD", tmp_path / "build")
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path / "results"))
    args = ["--quick", "-p", f"DECODERS=[{decoder!r}]", "-p", f"ENCODER={encoder!r}",
            "-p", f"MODELS=[{decoder!r}, {encoder!r}]", "-p", "DEVICE='cpu'", "01", "02", "03", "06"]
    assert runner.main(args) == 0, capsys.readouterr().out[-3000:]
    written = {p.name for p in (tmp_path / "figures").glob("*.png")}
    expected = {"01_tiny-qwen2_error_vs_k", "01_tiny-bert_error_vs_k", "01_tiny-qwen2_approximations",
                "02_tiny-qwen2_k99_median", "02_tiny-qwen2_head_drilldown", "02_tiny-qwen2_ff_sparsity",
                "03_tiny-qwen2_lm_perplexity_vs_k", "03_tiny-qwen2_passkey_vs_k", "03_retrieval_vs_k",
                "06_explore_default", "06_explore_tiny-bert"}
    assert {f"{stem}.png" for stem in expected} <= written, sorted(written)
    assert not any("smollm2" in name or "gemma3" in name or "minilm" in name for name in written)
