import numpy as np
import pytest

from topk_lib import _validate as V


@pytest.mark.parametrize("value", ["3", 2.0, True, None, [1]])
def test_positive_int_wrong_type_is_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        V.positive_int(value, "chunk_size")


@pytest.mark.parametrize("value", [0, -1])
def test_positive_int_out_of_range_is_value_error(value):
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got"):
        V.positive_int(value, "chunk_size")


def test_accepted_ints_come_back_as_python_ints():
    assert V.positive_int(np.int64(3), "n") == 3 and type(V.positive_int(np.int64(3), "n")) is int
    assert V.int_at_least(0, "n", 0) == 0
    assert V.optional_k(None, "k") is None and V.optional_k(5, "k") == 5
    assert V.index(2, "layer", 3, "layers") == 2


def test_optional_k_and_index_messages():
    with pytest.raises(ValueError, match=r"attn_k must be a positive int or None \(exact\)"):
        V.optional_k(0, "attn_k")
    with pytest.raises(TypeError, match="attn_k"):
        V.optional_k("8", "attn_k")
    with pytest.raises(ValueError, match=r"layer must be an int in 0..2 \(3 layers\), got 3"):
        V.index(3, "layer", 3, "layers")
    with pytest.raises(ValueError, match=">= 2"):
        V.int_at_least(1, "min_length", 2)


def test_sequences():
    assert V.int_sequence([4, 1, 4], "ks") == (4, 1, 4)
    assert V.fraction_sequence((0.9, 1), "fracs") == (0.9, 1.0)
    for bad, err in [((), ValueError), ((0, 1), ValueError), ("14", TypeError), ((1.5,), TypeError), ((True,), TypeError)]:
        with pytest.raises(err, match="ks must be a non-empty list/tuple of ints >= 1"):
            V.int_sequence(bad, "ks")
    for bad, err in [((), ValueError), ((0.0,), ValueError), ((1.5,), ValueError), (0.9, TypeError), (("a",), TypeError)]:
        with pytest.raises(err, match=r"fracs must be a non-empty list/tuple of floats in \(0, 1\]"):
            V.fraction_sequence(bad, "fracs")
