"""``python -m hf_sinks.duo {identify,bench}`` (``accelerate launch -m hf_sinks.duo identify ...``)."""

from .eval import main

main()
