"""When ``import hf_sinks`` registers its attention implementations with transformers (docs/design.md §5.1).

``import hf_sinks`` is cheap: it imports neither torch nor transformers (so ``hf-sinks --help`` answers at once).
The registration needs transformers' ``AttentionInterface``, which lives in ``transformers.modeling_utils``:

* if that module is already imported, :func:`register_now_or_on_import` registers at once;
* otherwise it installs :class:`RegisterOnImport`, which registers right after ``transformers.modeling_utils`` or a
  ``transformers.models.<x>.modeling_<x>`` module finishes executing, i.e. before any model class exists. Every
  ``from_pretrained(..., attn_implementation="sink_sdpa")`` therefore finds the names, as if the registration had
  run on ``import hf_sinks``. While a module of hf_sinks or transformers is still executing its top level (the
  trigger was a nested import), the registration waits for the next trigger to finish or the next use of a public
  ``hf_sinks`` name, so it never imports a half-initialized module.
"""

from __future__ import annotations

import importlib.abc
import re
import sys
from collections.abc import Callable
from typing import Any

#: Modules after whose execution the registration runs (model classes cannot exist before one of them ran), and our
#: own modules: one that imported transformers' model code while it initialized completes the registration after.
TRIGGER = re.compile(r"transformers\.modeling_utils|transformers\.models\.[^.]+\.modeling_[^.]+|hf_sinks\..+")


def _mid_import(packages: tuple[str, ...]) -> bool:
    """Whether a module of ``packages`` is still executing its top level somewhere up the call stack (a nested
    import): registering then would import model code that is itself half-initialized."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            name = frame.f_globals.get("__name__", "")
            if any(name == p or name.startswith(p + ".") for p in packages):
                return True
        frame = frame.f_back
    return False


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """A meta-path finder that finds nothing itself: it wraps the loader of a :data:`TRIGGER` module so that
    ``callback`` runs after the module executed, then leaves ``sys.meta_path`` once the callback succeeded."""

    def __init__(self, package: str, callback: Callable[[], None]) -> None:
        self.package = package
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not TRIGGER.fullmatch(fullname):
            return None
        for finder in sys.meta_path:  # the spec the rest of the import system would find
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        def exec_module(module: Any, _exec: Callable[[Any], None] = loader.exec_module) -> None:
            _exec(module)
            self.fire()

        loader.exec_module = exec_module  # an instance attribute: this module's loader only
        return spec

    def fire(self, now: bool = False) -> None:
        """Run the callback once transformers' modeling code is imported (or ``now``: a public name is in use),
        unless a module of ours or of transformers is mid-import; leave ``sys.meta_path`` once it ran."""
        if self not in sys.meta_path:
            return
        if not now and "transformers.modeling_utils" not in sys.modules:
            return  # (an hf_sinks module that needs no transformers, e.g. the CLI's options, triggers nothing)
        if _mid_import((self.package, "transformers")):
            return
        sys.meta_path.remove(self)
        self.callback()


def register_now_or_on_import(package: str, callback: Callable[[], None]) -> RegisterOnImport | None:
    """Run ``callback`` now if ``transformers.modeling_utils`` is imported, else when it (or a model module) is;
    returns the installed finder (``None`` if it ran now)."""
    if "transformers.modeling_utils" in sys.modules:
        callback()
        return None
    for finder in sys.meta_path:
        if isinstance(finder, RegisterOnImport) and finder.package == package:
            return finder
    finder = RegisterOnImport(package, callback)
    sys.meta_path.insert(0, finder)
    return finder


def pending(package: str) -> RegisterOnImport | None:
    """The finder still waiting to register ``package`` (``None`` once it registered)."""
    return next((f for f in sys.meta_path if isinstance(f, RegisterOnImport) and f.package == package), None)
