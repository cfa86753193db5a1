import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Small Llama and BERT models with a real (MiniLM) vocabulary, for tests that tokenize text.
# A test module may define its own tok / llama / bert, which then take precedence there.
@pytest.fixture(scope="module")
def tok():
    from tiny_models import bert_tokenizer  # imported here: transformers must see the offline settings above

    return bert_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    from tiny_models import small_llama

    return small_llama(tok)


@pytest.fixture(scope="module")
def bert(tok):
    from tiny_models import small_bert

    return small_bert(tok)
