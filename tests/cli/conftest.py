"""Fixtures of the ``hf-sinks`` tests: a tiny random Llama saved to disk with a tiny word-level tokenizer (built once
per session), a text it tokenizes, and a copy with a chat template. Helpers are in tests/helpers.py."""

import pytest
from helpers import add_chat_template, save_word_model, write_word_text


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    return write_word_text(tmp_path_factory.mktemp("text") / "words.txt")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, text_file):
    """A tiny Llama plus a word-level tokenizer (vocab < the model's) saved like any local HF model."""
    return save_word_model(tmp_path_factory.mktemp("tiny_model"), text_file.read_text())


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, model_dir):
    """The same model with a chat template on its tokenizer."""
    return add_chat_template(model_dir, tmp_path_factory.mktemp("tiny_chat"))
