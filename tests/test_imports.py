"""The package's import structure: every module imports, the library never imports the CLI, no import cycle.

The graph is read from the source with ``ast`` (every ``import``, at module level or inside a function: a lazy import
still ties two modules together), so it does not depend on what happens to be imported already.
"""

import ast
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_sinks


def _modules() -> dict[str, bool]:
    """``{module name: is a package}`` for every module of ``hf_sinks`` (``patches`` and ``kernels`` included)."""
    found = {"hf_sinks": True}
    for info in pkgutil.walk_packages(hf_sinks.__path__, "hf_sinks."):
        found[info.name] = info.ispkg
    for mapped in ("hf_sinks.patches", "hf_sinks.kernels"):  # package-dir: outside hf_sinks/ in an editable install
        found[mapped] = True
        for info in pkgutil.walk_packages(importlib.import_module(mapped).__path__, mapped + "."):
            found[info.name] = info.ispkg
    return found


MODULES = _modules()


def is_cli(name: str) -> bool:
    """Command-line modules: the ``hf_sinks.cli`` package (every ``hf-sinks`` command), and any ``cli`` or
    ``__main__`` module elsewhere (there should be none: see test_one_cli_package)."""
    last = name.rsplit(".", 1)[-1]
    return name == "hf_sinks.cli" or name.startswith("hf_sinks.cli.") or last in ("cli", "__main__")


def imported_modules(name: str) -> set[str]:
    """The ``hf_sinks`` modules that module ``name`` imports anywhere in its source."""
    origin = importlib.util.find_spec(name).origin
    if origin is None:  # kernels/ and patches/: folders without __init__.py (hf_sinks.source_tree), no code
        return set()
    tree = ast.parse(open(origin, encoding="utf-8").read())
    package = name if MODULES[name] else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from . import x` names a module, `from .x import y` a name in x
                full = f"{base}.{alias.name}"
                out.add(full if full in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imported_modules(name) for name in MODULES}
LIBRARY = sorted(name for name in MODULES if not is_cli(name))


def test_the_walk_sees_the_package():
    assert {
        "hf_sinks.cache",
        "hf_sinks.cli",
        "hf_sinks.h2o.cache",
        "hf_sinks.duo.cache",
        "hf_sinks.eval.perplexity",
        "hf_sinks.attention.functions",
        "hf_sinks.patches.falcon",
    } <= set(MODULES)
    assert {
        "hf_sinks.cli",
        "hf_sinks.cli.options",
        "hf_sinks.cli.duo",
        "hf_sinks.cli.train",
        "hf_sinks.cli.__main__",
    } <= {name for name in MODULES if is_cli(name)}


def test_one_cli_package():
    """Every command lives in ``hf_sinks.cli``: no ``cli*`` module or ``__main__`` elsewhere in the package, one
    module per command, and pyproject.toml installs the package (its ``packages`` list is explicit)."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    elsewhere = [name for name in MODULES if is_cli(name) and not name.startswith("hf_sinks.cli")]
    elsewhere += [name for name in MODULES if name.rsplit(".", 1)[-1].startswith("cli") and not is_cli(name)]
    assert not elsewhere, elsewhere
    commands = {"options", "perplexity", "generate", "bench", "passkey", "analyze", "train", "duo", "__main__"}
    assert {name.rsplit(".", 1)[-1] for name in MODULES if name.startswith("hf_sinks.cli.")} == commands
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "hf_sinks.cli" in pyproject["tool"]["setuptools"]["packages"]
    assert pyproject["project"]["scripts"]["hf-sinks"] == "hf_sinks.cli:main"


def test_the_cli_is_a_leaf():
    """Only ``hf_sinks.cli`` modules import ``hf_sinks.cli``: the library, ``patches`` and ``kernels`` never do."""
    importers = {name for name in MODULES for m in GRAPH[name] if is_cli(m)}
    assert importers <= {name for name in MODULES if is_cli(name)}, importers - {n for n in MODULES if is_cli(n)}


@pytest.mark.parametrize("name", sorted(name for name in MODULES if not name.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("name", LIBRARY)
def test_library_never_imports_the_cli(name):
    assert not {m for m in GRAPH[name] if is_cli(m)}, f"{name} imports command-line code"


def test_no_import_cycle_between_library_modules():
    graph = {name: sorted(m for m in GRAPH[name] if not is_cli(m)) for name in LIBRARY}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(name):
        state[name] = 1
        path.append(name)
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in LIBRARY:
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_one_layer_lookup_for_every_cache():
    """Every cache tags its keys through hf_sinks.cache_layers; an attention finds only a layer of its own type."""
    import torch

    from hf_sinks.cache import SinkCacheLayer
    from hf_sinks.cache_layers import RowStateLayer, layer_of
    from hf_sinks.duo import DuoCacheLayer
    from hf_sinks.h2o import H2OCacheLayer

    for layer_type in (SinkCacheLayer, H2OCacheLayer, DuoCacheLayer):
        assert issubclass(layer_type, RowStateLayer)
    for name in LIBRARY:
        origin = importlib.util.find_spec(name).origin
        source = "" if origin is None else open(origin, encoding="utf-8").read()
        assert "setattr(keys" not in source or name == "hf_sinks.cache_layers", name
    key = torch.zeros(1)
    assert layer_of(key, SinkCacheLayer) is None


def test_tests_import_shared_helpers_not_conftest_or_other_tests():
    """Shared test helpers come from tests/helpers.py; no test imports conftest or another test module."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                if name.split(".")[0] == "conftest" or name.split(".")[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(tests)}: {name}")
    # test_registry reads the coverage test's model tables (STREAMING, ALIASES); they move into helpers.py once the
    # model-coverage work that still edits them has merged.
    pending = {"test_registry.py: test_model_coverage"}
    assert not set(offenders) - pending, offenders


# ------------------------------------------------------------------ the repository root shadows nothing
ROOT = Path(__file__).resolve().parents[1]


def _root_importables() -> set[str]:
    """Names a Python started at the repository root could import as a regular module or package from it."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd", ".pyc"):
            names.add(entry.name.split(".")[0])
    return names


def test_the_root_exposes_only_hf_sinks():
    """Only ``hf_sinks`` is a regular package at the root: ``kernels/`` and ``patches/`` (required top-level folders)
    have no ``__init__.py``, so from the root they are namespace portions, which never win over an installed
    distribution such as HF's ``kernels`` (transformers >= 5.25 imports it). Any new root-level module or package
    would shadow whatever is installed under its name."""
    assert _root_importables() == {"hf_sinks"}
    for name in ("kernels", "patches"):
        assert (ROOT / name).is_dir() and not (ROOT / name / "__init__.py").exists()


def _run_at_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_python_at_the_root_imports_the_installed_distributions():
    """``python -c`` at the root (sys.path[0] is the root) imports transformers' model code, and every top-level
    name that an installed distribution provides resolves to that distribution, not to a folder of ours."""
    code = (
        "import importlib.metadata, importlib.util, json, sys\n"
        "import hf_sinks, transformers.models.llama.modeling_llama\n"
        "import hf_sinks.kernels.sink_attention, hf_sinks.patches.falcon\n"
        "provided = importlib.metadata.packages_distributions()\n"
        "out = {}\n"
        "for name in ('kernels', 'patches'):\n"
        "    spec = importlib.util.find_spec(name) if name in provided else None\n"
        "    out[name] = None if spec is None else (spec.origin, list(spec.submodule_search_locations or []))\n"
        "print(json.dumps(out))\n"
    )
    done = _run_at_root("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name, spec in found.items():
        if spec is None:
            continue  # no installed distribution of that name here
        origin, locations = spec
        ours = ROOT / name  # (the distribution itself may sit under the root, in .venv/)
        assert origin is not None and not Path(origin).is_relative_to(ours), (name, origin)
        assert all(not Path(p).is_relative_to(ours) for p in locations), (name, locations)


def test_the_cli_runs_at_the_root():
    done = _run_at_root("-m", "hf_sinks.cli", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perplexity" in done.stdout


def test_help_and_import_load_neither_torch_nor_transformers():
    """``import hf_sinks`` and building the CLI parser (what ``hf-sinks --help`` does) stay cheap: they import no
    torch and no transformers (the public names load on first use; docs/design.md §5.1)."""
    code = (
        "import sys\n"
        "import hf_sinks\n"
        "from hf_sinks.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    done = _run_at_root("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
