import json

import pytest

from hf_sinks import SinkConfig


def test_defaults_follow_the_paper():
    config = SinkConfig()
    assert (config.num_sink_tokens, config.window_length, config.capacity) == (4, 1020, 1024)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"num_sink_tokens": -1}, r"num_sink_tokens=-1 is invalid: must be an int >= 0"),
        ({"window_length": 0}, r"window_length=0 is invalid: must be an int >= 1"),
        ({"window_length": -5}, r"window_length.*-5"),
        ({"num_sink_tokens": 2.5}, r"num_sink_tokens=2\.5 is invalid: must be an int >= 0, not float"),
        ({"window_length": "64"}, r"window_length.*'64'"),
        ({"num_sink_tokens": True}, r"num_sink_tokens.*True"),
        ({"position_mode": "absolute-ish"}, r"position_mode='absolute-ish'.*cache"),
    ],
)
def test_bad_values_raise_naming_value_and_range(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SinkConfig(**kwargs)


def test_unknown_key_raises_listing_allowed():
    with pytest.raises(ValueError, match=r"\['sink_size'\].*allowed keys.*num_sink_tokens"):
        SinkConfig.from_dict({"sink_size": 4})


def test_json_round_trip(tmp_path):
    config = SinkConfig(num_sink_tokens=2, window_length=30)
    path = tmp_path / "sinks.json"
    config.to_json_file(path)
    assert json.loads(path.read_text()) == config.to_dict()
    assert SinkConfig.from_json_file(path) == config


def test_from_model_config_reads_flag_and_overrides():
    class Cfg:
        attention_sinks = {"num_sink_tokens": 1, "window_length": 9}

    assert SinkConfig.from_model_config(Cfg()) == SinkConfig(1, 9)
    assert SinkConfig.from_model_config(Cfg(), window_length=20) == SinkConfig(1, 20)
    assert SinkConfig.from_model_config(object()) is None
    assert SinkConfig.from_model_config(object(), num_sink_tokens=2) == SinkConfig(2, 1020)


def test_for_model_defaults_flag_then_explicit_sizes():
    """``for_model``: the defaults without a flag, the flag's sizes, explicit sizes over the flag, ``None`` = unset."""

    class Cfg:
        attention_sinks = {"num_sink_tokens": 1, "window_length": 9}

    assert SinkConfig.for_model(object()) == SinkConfig(4, 1020)
    assert SinkConfig.for_model(Cfg()) == SinkConfig(1, 9)
    assert SinkConfig.for_model(Cfg(), num_sink_tokens=None, window_length=20) == SinkConfig(1, 20)
    assert SinkConfig.for_model(object(), 0, 16) == SinkConfig(0, 16)
    with pytest.raises(ValueError, match=r"window_length=-3"):
        SinkConfig.for_model(Cfg(), window_length=-3)
