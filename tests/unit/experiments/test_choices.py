"""Layers, heads and ks derived from a model: checked against values worked out by hand."""

import pandas as pd
import pytest

from tests import architectures
from tests.tiny_models import D_FF, tiny_bert, tiny_llama
from topk_lib.experiments import choices


def test_spread_layers_reaches_the_last_layer():
    assert choices.spread_layers(30, 5) == [1, 8, 15, 22, 29]
    assert choices.spread_layers(18, 5) == [1, 5, 9, 13, 17]
    assert choices.spread_layers(2, 5) == [1]  # duplicates dropped
    assert choices.spread_layers(1, 2) == [0]
    assert choices.spread_layers(6, 1) == [5]
    assert choices.spread_layers([5, 11, 17], 5) == [5, 11, 17]
    assert choices.spread_layers([0, 1, 2, 3, 4, 5], 3) == [0, 2, 5]  # the middle position 2.5 rounds to even
    with pytest.raises(ValueError, match="count"):
        choices.spread_layers(6, 0)
    with pytest.raises(ValueError, match="no candidate"):
        choices.spread_layers([], 2)


def test_layer_at_a_depth():
    assert [choices.layer_at(30, d) for d in (0, 0.4, 1)] == [0, 12, 29]
    assert choices.layer_at(18, 0.4) == 7
    with pytest.raises(ValueError, match="depth"):
        choices.layer_at(18, 1.5)


def test_ff_ks_are_fractions_of_d_ff():
    assert choices.ff_ks([0.5, 0.25, 0.0625], 1536) == [768, 384, 96]
    assert choices.ff_ks([0.5, 0.25, 0.0625], 2048) == [1024, 512, 128]
    assert choices.ff_ks([0.0001], 100) == [1]
    with pytest.raises(ValueError, match="fractions"):
        choices.ff_ks([384], 1536)  # a k where a fraction belongs
    with pytest.raises(ValueError, match="no feed-forward"):
        choices.ff_ks([0.5], None)


def test_lm_setups_turn_fractions_into_ks():
    setups = {1024: {"windows": 2, "attn": [128, 8], "ff": [0.5, 0.0625], "both": [[128, 0.5], [8, 0.0625]]}}
    assert choices.lm_setups(setups, 1536) == {
        1024: {"windows": 2, "attn": [128, 8], "ff": [768, 96], "both": [[128, 768], [8, 96]]}}
    assert setups[1024]["ff"] == [0.5, 0.0625]  # the parameter itself is left as typed


def stats_frame(values, layer=3):
    rows = [{"layer": layer, "head": h, "bucket": "all", "k": 1, "metric": "k99_median", "value": v}
            for h, v in enumerate(values)]
    rows.append({"layer": layer, "head": 0, "bucket": "0-64", "k": 1, "metric": "k99_median", "value": 1e9})
    rows.append({"layer": layer + 1, "head": 0, "bucket": "all", "k": 1, "metric": "k99_median", "value": 5.0})
    return pd.DataFrame(rows)


def test_median_index():
    assert choices.median_index([0.9, 0.1, 0.5]) == 2
    assert choices.median_index([4, 3, 2, 1]) == 2  # even: the lower middle value (2)
    with pytest.raises(ValueError):
        choices.median_index([])


def test_median_head():
    assert choices.median_head(stats_frame([76, 217, 395.5, 49, 171]), 3) == 4  # sorted 49 76 [171] 217 395.5
    assert choices.median_head(stats_frame([10, 40, 30, 20]), 3) == 3  # even: the lower middle (20)
    assert choices.median_head(stats_frame([5, 5, 5]), 3) == 1  # ties: by head number
    with pytest.raises(ValueError, match="layer 9"):
        choices.median_head(stats_frame([1, 2]), 9)


def test_model_shape_of_tiny_models():
    llama = choices.model_shape(tiny_llama())
    assert (llama.n_layers, llama.heads, llama.d_ff, llama.windows) == (2, 6, D_FF, {})
    assert choices.model_shape(tiny_bert()).n_layers == 2


def test_model_shape_sees_sliding_windows():
    shape = choices.model_shape(architectures.build("gemma3"))  # layer 0 sliding (window 4), layer 1 global
    assert shape.windows == {0: 4}
    assert shape.window_note(16) == "1 of 2 layers attend within a 4-token window (no top-k beyond it)"
    assert shape.window_note(4) == ""  # a window no shorter than the input changes nothing
    assert shape.full_layers(16) == [1] and shape.full_layers(16, first=0) == [1] and shape.full_layers(4, first=0) == [0, 1]


def test_model_tags_and_labels():
    assert [choices.model_tag(n) for n in ("smollm2-135m", "gemma3-270m", "minilm-l6")] == ["smollm2", "gemma3", "minilm"]
    assert choices.model_tag("meta-llama/Llama-3.2-1B") == "Llama-3.2-1B"
    assert choices.model_tag("/tmp/tiny qwen2/") == "tiny_qwen2"
    assert choices.model_label("gemma3-270m") == "Gemma-3-270M"
    assert choices.model_label("org/X") == "X"
