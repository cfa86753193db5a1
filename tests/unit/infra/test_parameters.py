"""Notebook parameters: the defaults of a parameters cell, and values checked against their types."""

import pytest

from topk_lib.infra.parameters import cell_defaults, check_parameters

DEFAULTS = {
    "QUICK": False, "SEED": 0, "LENGTH": 2048, "LR": 0.001, "SHIFT": -1.0, "DEVICE": "cpu", "KS": [8, 16, None],
    "DEPTHS": [0.1, 0.9], "MODEL": {"d_model": 64, "pool": "mean"}, "SETUPS": {1024: {"windows": 2, "ks": [[8, 96]]}},
    "FILTER": [], "EXTRA": None,
}


def test_cell_defaults_reads_literal_assignments():
    code = "QUICK = False  # smoke run\nKS = [1, 2]  # ks\nPROMPT = ('a '\n          'b')\nX = f(1)\n"
    assert cell_defaults(code) == {"QUICK": False, "KS": [1, 2], "PROMPT": "a b"}


@pytest.mark.parametrize("given", [
    {}, {"QUICK": True}, {"SEED": 0}, {"SEED": 7}, {"LENGTH": 0}, {"LR": 1}, {"LR": 0.5}, {"SHIFT": -3}, {"SHIFT": 2.0},
    {"DEVICE": "cuda"}, {"KS": [4, None]}, {"KS": (1, 2)}, {"DEPTHS": [0, 1]}, {"MODEL": {"d_model": 32}},
    {"SETUPS": {4096: {"windows": 1, "ks": [[2, 4], [8, 16]]}}}, {"FILTER": ["x", 3]}, {"EXTRA": {"anything": [1]}},
])
def test_values_like_their_defaults_pass(given):
    assert check_parameters(DEFAULTS, given) == given


@pytest.mark.parametrize("given, error, message", [
    ({"LENGTH": "abc"}, TypeError, "LENGTH must be an int (its default is 2048), got 'abc'"),
    ({"LENGTH": -5}, ValueError, "LENGTH must be an int >= 0 (its default is 2048), got -5"),
    ({"LENGTH": 512.0}, TypeError, "LENGTH must be an int"),
    ({"LENGTH": True}, TypeError, "LENGTH must be an int"),
    ({"SEED": -1}, ValueError, "SEED must be an int >= 0 (its default is 0), got -1"),
    ({"QUICK": 1}, TypeError, "QUICK must be a bool (its default is False), got 1"),
    ({"LR": -0.1}, ValueError, "LR must be a float >= 0"),
    ({"LR": float("nan")}, ValueError, "LR must be a finite number"),
    ({"LR": "1e-3"}, TypeError, "LR must be a float"),
    ({"DEVICE": ""}, ValueError, "DEVICE must be a non-empty str"),
    ({"DEVICE": 0}, TypeError, "DEVICE must be a str"),
    ({"KS": 16}, TypeError, "KS must be a list"),
    ({"KS": []}, ValueError, "KS must be a non-empty list"),
    ({"KS": [8, "x"]}, TypeError, r"KS[1] must be an int or None (its default is [8, 16, None]), got 'x'"),
    ({"KS": [8, -2]}, ValueError, "KS[1] must be an int >= 0"),
    ({"DEPTHS": [0.5, -0.1]}, ValueError, "DEPTHS[1] must be a float >= 0"),
    ({"MODEL": {"d_modl": 32}}, ValueError, "MODEL takes the keys 'd_model', 'pool', got the key 'd_modl'"),
    ({"MODEL": {"d_model": "big"}}, TypeError, "MODEL['d_model'] must be an int"),
    ({"SETUPS": {"1024": {"windows": 1}}}, TypeError, "a key of SETUPS must be an int"),
    ({"SETUPS": {1024: {"ks": [[8, -1]]}}}, ValueError, "SETUPS[1024]['ks'][0][1] must be an int >= 0"),
    ({"LENTH": 5}, ValueError, "LENTH is not a parameter of this notebook; its parameters cell declares: QUICK, SEED"),
])
def test_a_bad_value_names_the_parameter(given, error, message):
    with pytest.raises(error) as info:
        check_parameters(DEFAULTS, given)
    assert message in str(info.value)


def test_the_arguments_must_be_dicts():
    with pytest.raises(TypeError, match="defaults and given must be dicts"):
        check_parameters(DEFAULTS, [("LENGTH", 1)])
