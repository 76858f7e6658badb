"""``python -m hf_sinks.cli ...`` is ``hf-sinks ...``; it is also what ``accelerate launch -m hf_sinks.cli train ...``
and ``accelerate launch -m hf_sinks.cli duo identify ...`` run (each rank leaves through
:func:`hf_sinks.launch.exit_process`)."""

from hf_sinks.launch import exit_process

from . import main

exit_process(main())
