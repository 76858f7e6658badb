"""transformers' ``custom_generate`` route: a local drop-in for the Hub repo ``transformers-community/sink_cache``.

transformers removed its ``SinkCache``; its replacement is a Hub repo whose ``custom_generate/generate.py``
``generate(..., custom_generate=<repo or folder>, trust_remote_code=True)`` loads and calls. hf_sinks ships a folder
in the same layout (``hf_sinks/custom_generate_repo``, path from :func:`custom_generate_path`) whose
``generate.py`` is :func:`generate` below, so the same call streams with hf_sinks' exact machinery, offline::

    out = model.generate(ids, custom_generate=hf_sinks.custom_generate_path(), trust_remote_code=True,
                         window_length=256, num_sink_tokens=4, max_new_tokens=1000)

transformers runs ``custom_generate/generate.py`` only with ``trust_remote_code=True``, a local folder included.

The arguments mean what they mean for the Hub repo (whose SinkCache is transformers 4.52's): ``window_length`` is the
whole cache, sinks included, so ``window_length=256, num_sink_tokens=4`` keeps 256 tokens per layer, i.e.
``hf_sinks.SinkCache(num_sink_tokens=4, window_length=252)`` in hf_sinks' own terms (whose ``window_length`` is
the recent window only). A call written for the Hub repo behaves the same here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .compat import CACHE_KWARGS, cache_kwargs
from .validation import check_int

#: The Hub repo's defaults (``transformers-community/sink_cache``).
DEFAULT_WINDOW_LENGTH = 256
DEFAULT_NUM_SINK_TOKENS = 4

#: ``generate`` arguments this route refuses when set, and why.
UNSUPPORTED_ARGUMENTS = {
    "cache_implementation": "this route always generates with its own hf_sinks.SinkCache",
    "cache_config": "this route always generates with its own hf_sinks.SinkCache",
    "assistant_model": "assisted generation rolls the cache back (crop), which a SinkCache cannot do",
    "prompt_lookup_num_tokens": "assisted generation rolls the cache back (crop), which a SinkCache cannot do",
}

_FOLDER = Path(__file__).resolve().parent / "custom_generate_repo"


def custom_generate_path() -> str:
    """The local folder to pass as ``custom_generate=`` (Hub repo layout: ``custom_generate/generate.py``)."""
    if not (_FOLDER / "custom_generate" / "generate.py").is_file():
        raise FileNotFoundError(
            f"hf_sinks' custom_generate folder is missing ({_FOLDER}/custom_generate/generate.py): this installation "
            "was built without its package data; reinstall hf_sinks."
        )
    return str(_FOLDER)


def generate(
    model: Any,
    *args: Any,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    num_sink_tokens: int = DEFAULT_NUM_SINK_TOKENS,
    **kwargs: Any,
) -> Any:
    """``model.generate(*args, **kwargs)`` streaming with an :class:`hf_sinks.SinkCache` of the given sizes.

    Called by transformers for ``generate(..., custom_generate=custom_generate_path(), trust_remote_code=True)``.
    A model not yet streaming is switched with :func:`hf_sinks.apply` for this call only (a ``sink_*`` attention,
    bounded positions, the Falcon patch) and restored exactly afterwards, even when generation raises; a model
    already streaming (``hf_sinks.apply`` or ``hf_sinks.AutoModelForCausalLM``) keeps its setup and gets a cache
    of the requested sizes. The model must be a type hf_sinks supports (``hf_sinks.apply`` says why if not).

    Raises:
        ValueError: bad ``window_length``/``num_sink_tokens``, a cache or ``cache_implementation`` passed in,
            ``use_cache=False``, assisted generation, or an unsupported model; the model is untouched.
    """
    from .api import _APPLIED, apply
    from .attention.registry import ATTENTION_IMPLEMENTATIONS
    from .cache import SinkCache

    hint = "custom_generate (hf_sinks)"
    window_length = check_int("window_length", window_length, 1, hint=f"{hint}: the whole cache, sinks included")
    num_sink_tokens = check_int("num_sink_tokens", num_sink_tokens, 0, hint=f"{hint}: the initial tokens kept forever")
    if window_length <= num_sink_tokens:
        raise ValueError(
            f"{hint}: window_length={window_length} must be larger than num_sink_tokens={num_sink_tokens} (as in the "
            "Hub repo, window_length is the whole cache, sinks included)."
        )
    window_length -= num_sink_tokens  # hf_sinks' window: the recent tokens besides the sinks
    SinkCache(num_sink_tokens, window_length)  # the remaining size checks, before the model is touched
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{hint} brings its own SinkCache; do not pass {name}= (got {type(kwargs[name]).__name__})."
            )
        kwargs.pop(name, None)
    for name, why in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{hint}: {name}={kwargs[name]!r} is not supported: {why}.")
    if kwargs.get("use_cache") is False:
        raise ValueError(f"{hint}: use_cache=False leaves nothing to stream; drop it or use plain generate.")

    handle = getattr(model, _APPLIED, None)
    if handle is not None:  # already streaming: keep its setup, stream with the requested sizes
        return model.generate(
            *args, **kwargs, **cache_kwargs(SinkCache.from_model(model, num_sink_tokens, window_length))
        )
    current = model.config._attn_implementation
    with apply(
        model,
        num_sink_tokens,
        window_length,
        attn_implementation=current if current in ATTENTION_IMPLEMENTATIONS else None,
    ) as handle:
        return model.generate(*args, **kwargs, **cache_kwargs(handle.new_cache()))
