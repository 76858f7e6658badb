"""Where ``hf_sinks.kernels`` and ``hf_sinks.patches`` come from (docs/design.md §5.1, "Top-level folders").

The Triton kernels and the per-model patches live in the repository's top-level ``kernels/`` and ``patches/``
folders, which have no ``__init__.py`` on purpose: a folder without one is only a namespace portion, and Python
prefers any regular package found anywhere on ``sys.path`` to it. So a Python started at the repository root
(``python -m pytest``, ``python -c ...``) still imports HF's ``kernels`` distribution, which transformers >= 5.25
needs, instead of our folder. A wheel installs the two folders inside the package (``hf_sinks/kernels``,
``hf_sinks/patches``, setuptools ``package-dir``); from a source checkout or an editable install :func:`mount`
makes ``hf_sinks.kernels`` / ``hf_sinks.patches`` point at the top-level folders (setuptools' editable finder
cannot map a package without ``__init__.py``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: Top-level folders of the repository that install as subpackages of ``hf_sinks``.
MAPPED_FOLDERS = ("kernels", "patches")


def mount(package: str, package_dir: Path) -> None:
    """Register ``<package>.<folder>`` for each of :data:`MAPPED_FOLDERS` that is not installed inside
    ``package_dir`` but sits beside it (a source checkout). Idempotent."""
    parent = sys.modules[package]
    for name in MAPPED_FOLDERS:
        full = f"{package}.{name}"
        folder = package_dir.parent / name
        if full in sys.modules or (package_dir / name).is_dir() or not folder.is_dir():
            continue
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        setattr(parent, name, module)
