"""Scaling out on CPU, launched the way a user launches it: ``torchrun`` / ``accelerate launch`` subprocesses, gloo.

* data-parallel fine-tuning (``examples/finetune_sinks.py``) on 2 processes, ``sinklora`` (SF-Attn) under
  ``torchrun`` and ``sink_token`` under ``accelerate launch`` with ``examples/accelerate_configs/multi_cpu.yaml``: the
  loss curve and the saved adapter equal a 1-process run with the same global batch and seed (to ``LOSS_ATOL`` /
  ``WEIGHT_ATOL``), exactly one adapter is written (by rank 0), and it reloads with ``load_finetuned`` and streams
  past the cache capacity exactly like the spec (``hf_sinks.oracle.reference_logits``);
* a launch that gives fewer processes than asked for, and FSDP asked of CPU processes, stop with a clear error;
* tensor-parallel streaming (``examples/tensor_parallel_streaming.py``, ``tp_plan="auto"``): each rank's SinkCache
  holds only its key/value heads and the logits past capacity equal the 1-process streaming logits;
* a ``device_map`` with a disk-offloaded layer: every SinkCache layer lives on its layer's execution device.

What needs GPUs (FSDP through accelerate, a layer split over two devices) is marked ``gpu``. docs/scaling_out.md.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from training_helpers import LEARNABLE_TEXT, char_tokenizer

import hf_sinks
from hf_sinks.oracle import reference_logits
from hf_sinks.training import load_finetuned, prepend_sink_token
from hf_sinks.training.finetune import LOSS_CSV, RECIPE_FILE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "finetune_sinks.py"
TP_EXAMPLE = REPO / "examples" / "tensor_parallel_streaming.py"
CONFIGS = REPO / "examples" / "accelerate_configs"
BIN = Path(sys.executable).parent
#: Largest |loss(2 processes) - loss(1 process)| per logged step, in nats. Measured: <= 1e-6 (fp32, gloo allreduce).
LOSS_ATOL = 1e-4
#: Largest difference of any saved adapter tensor between the 2-process and the 1-process run.
WEIGHT_ATOL = 1e-4
STEPS = 6
LAUNCH_TIMEOUT = 240


def _tool(name: str) -> str:
    """``torchrun`` / ``accelerate`` of this interpreter's environment (else on PATH)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.skip(f"{name} not found"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _launch(cmd: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _load_example(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama + a char tokenizer saved as an HF model directory, and a training text."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "tiny-llama"
    tiny_model("llama", attn_implementation="sdpa").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(LEARNABLE_TEXT)
    return model_dir, text


def _fsdp_two_process_command(tiny, out: Path) -> list[str]:
    """``accelerate launch`` of the fine-tuning example on 2 processes with the FSDP config (batch 1 each)."""
    launch = [_tool("accelerate"), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2"]
    launch += ["--mixed_precision", "no", "--main_process_port", str(_free_port()), str(EXAMPLE)]
    return [*launch, *_train_args(tiny, "sinklora", out, 1), "--expect-world-size", "2"]


def _train_args(tiny, recipe: str, out: Path, per_device_batch: int) -> list[str]:
    model_dir, text = tiny
    return [
        "--model",
        str(model_dir),
        "--text-file",
        str(text),
        "--recipe",
        recipe,
        "--seq-len",
        "32",
        "--max-steps",
        str(STEPS),
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "0",
        "--seed",
        "3",
        "--per-device-train-batch-size",
        str(per_device_batch),
        "--output-dir",
        str(out),
        "--no-progress",
        "--no-plot",
        "--demo-tokens",
        "0",
        "--threads",
        "1",
    ]


def _losses(out: Path) -> list[float]:
    with open(out / LOSS_CSV) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _streams_like_the_spec(model_dir: Path, out: Path, sink_token_id: int | None) -> None:
    """Reload the adapter onto a fresh base, stream past capacity with generate, compare with the fp64 spec."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    merged = load_finetuned(base, out, merge=True)
    handle = hf_sinks.apply(merged, window_length=8)
    sinks = handle.sink_config.num_sink_tokens
    prompt = char_tokenizer()("the cat", return_tensors="pt")["input_ids"]
    if sink_token_id is not None:
        prompt = prepend_sink_token(prompt, sink_token_id)
    new = 24
    gen = merged.generate(
        prompt,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq = gen.sequences
    assert seq.shape[1] == prompt.shape[1] + new > sinks + 8  # well past the cache capacity
    streamed = torch.stack(gen.logits, 1)[0].float()
    spec = reference_logits(merged, seq[0, :-1], sinks, 8)[prompt.shape[1] - 1 :].float()
    torch.testing.assert_close(streamed, spec, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe, launcher", [("sinklora", "torchrun"), ("sink_token", "accelerate")])
def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tiny, tmp_path, recipe, launcher):
    example = _load_example(EXAMPLE, "finetune_sinks_example")
    single = tmp_path / "single"
    assert example.main(_train_args(tiny, recipe, single, per_device_batch=2)) == 0  # 1 process x batch 2

    dist_out = tmp_path / "two"
    args = _train_args(tiny, recipe, dist_out, per_device_batch=1) + ["--expect-world-size", "2"]  # 2 x 1
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [_tool("torchrun"), "--nproc_per_node", "2", "--master_port", port, str(EXAMPLE), *args]
    else:
        cmd = [
            _tool("accelerate"),
            "launch",
            "--config_file",
            str(CONFIGS / "multi_cpu.yaml"),
            "--main_process_port",
            port,
            str(EXAMPLE),
            *args,
        ]
    proc = _launch(cmd)
    for rank in (0, 1):
        assert f"rank {rank} of 2 (MULTI_CPU, backend gloo): {STEPS} logged steps" in proc.stdout, proc.stdout
    assert proc.stdout.count("saved to") == 1  # only the main process reports (and writes) the adapter

    one, two = _losses(single), _losses(dist_out)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) <= LOSS_ATOL, (one, two)
    assert two[-1] < two[0] - 0.2  # it trained: the comparison is not between two flat lines

    adapters = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("adapter_model.safetensors"))
    assert adapters == [Path("single/adapter_model.safetensors"), Path("two/adapter_model.safetensors")]
    assert not list(dist_out.glob("checkpoint-*"))
    ref, got = _adapter(single), _adapter(dist_out)
    assert sorted(got) == sorted(ref) and got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=WEIGHT_ATOL, msg=name)

    import json

    saved = json.loads((dist_out / RECIPE_FILE).read_text())
    if recipe == "sinklora":
        assert saved["attn_implementation"] == "sink_sfattn"  # trained with SF-Attn, not a fallback
    _streams_like_the_spec(tiny[0], dist_out, saved.get("sink_token_id"))


def test_a_launch_with_fewer_processes_than_asked_stops_before_training(tiny, tmp_path, capsys):
    # what `accelerate launch --cpu --num_processes 2` really starts: one process, WORLD_SIZE unset
    example = _load_example(EXAMPLE, "finetune_sinks_example")
    out = tmp_path / "out"
    status = example.main(_train_args(tiny, "sink_token", out, 1) + ["--expect-world-size", "2"])
    assert status == 2
    err = capsys.readouterr().err
    assert "expected a world of 2 training process(es), got 1" in err and "multi_cpu.yaml" in err
    assert not (out / "adapter_model.safetensors").exists()


def test_fsdp_on_cpu_processes_is_an_error_not_silent_ddp(tiny, tmp_path):
    """accelerate enables FSDP only for accelerator process groups: on CPU the example must refuse, not train DDP.

    If this fails because the run succeeded, accelerate learned FSDP on CPU: turn this into a parity test like the
    one above and update docs/scaling_out.md.
    """
    out = tmp_path / "fsdp"
    proc = _launch(_fsdp_two_process_command(tiny, out), expect_ok=False)
    assert proc.returncode != 0
    # newer accelerate silently falls back to DDP and the example refuses; older accelerate (the floor) refuses itself
    ours = proc.stderr.count("FSDP was requested but accelerate") == 2 and "distributed type MULTI_CPU" in proc.stderr
    theirs = proc.stderr.count("There are currently no available devices found") == 2
    assert ours or theirs, proc.stderr[-4000:]
    assert not (out / "adapter_model.safetensors").exists()


def test_tensor_parallel_streaming_shards_the_cache_and_keeps_the_logits(tiny, tmp_path):
    model_dir, _ = tiny
    args = [
        "--model",
        str(model_dir),
        "--num-sink-tokens",
        "2",
        "--window-length",
        "6",
        "--prompt-length",
        "5",
        "--max-new-tokens",
        "20",
        "--threads",
        "1",
    ]
    tp_module = _load_example(TP_EXAMPLE, "tensor_parallel_streaming_example")
    assert tp_module.main(args + ["--output", str(tmp_path / "single.pt")]) == 0  # the 1-process reference
    proc = _launch(
        [
            _tool("torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(TP_EXAMPLE),
            *args,
            "--expect-world-size",
            "2",
            "--output",
            str(tmp_path / "tp.pt"),
        ]
    )
    single, tp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "tp.pt")
    assert tp["world_size"] == 2 and tp["cache_type"] == "SinkCache"
    kv_heads = tp["num_key_value_heads"]
    assert single["cache_key_shapes"] == [[(1, kv_heads, 8, 16)] * 2]
    assert tp["cache_key_shapes"] == [[(1, kv_heads // 2, 8, 16)] * 2] * 2, proc.stdout  # each rank: its heads only
    assert single["sequences"].shape[1] == 25 > tp["capacity"]  # streamed past the 2 + 6 slots
    assert torch.equal(tp["sequences"], single["sequences"])
    torch.testing.assert_close(tp["logits"], single["logits"], rtol=1e-5, atol=1e-5)


def _execution_device(module: torch.nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def _stream(model, steps: int = 20):
    hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    prompt = torch.arange(1, 6)[None].to(_execution_device(model.get_input_embeddings()))
    return model.generate(
        prompt,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


def test_device_map_with_a_disk_offloaded_layer_keeps_each_cache_layer_on_its_execution_device(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map=device_map, offload_folder=str(tmp_path / "off"), dtype=torch.float32
    ).eval()
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got, ref = _stream(offloaded), _stream(whole)
    layers = offloaded.model.layers
    assert [layer.keys.device for layer in got.past_key_values.layers] == [_execution_device(m) for m in layers]
    assert all(layer.keys.shape[2] == 8 for layer in got.past_key_values.layers)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_map_split_over_devices_keeps_each_cache_layer_on_its_layer_device(tiny):
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    device_map = {
        "model.embed_tokens": "cuda:0",
        "model.rotary_emb": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": second,
        "model.norm": second,
        "lm_head": second,
    }
    split = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, dtype=torch.float32).eval()
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got, ref = _stream(split), _stream(whole)
    devices = [layer.keys.device for layer in got.past_key_values.layers]
    assert devices == [torch.device("cuda", 0), torch.device(second)]
    assert torch.equal(got.sequences.cpu(), ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits).cpu(), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_on_two_gpus_trains_like_one_process(tiny, tmp_path):
    example = _load_example(EXAMPLE, "finetune_sinks_example")
    single = tmp_path / "single"
    assert example.main(_train_args(tiny, "sinklora", single, per_device_batch=2)) == 0
    out = tmp_path / "fsdp"
    proc = _launch(_fsdp_two_process_command(tiny, out))
    assert proc.stdout.count("(FSDP, backend") == 2 and " 0 sharded (DTensor)" not in proc.stdout, proc.stdout
    one, two = _losses(single), _losses(out)
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-3, (one, two)
    assert len(list(tmp_path.rglob("adapter_model.safetensors"))) == 2
    _streams_like_the_spec(tiny[0], out, None)


def test_world_size_errors_name_the_cause(monkeypatch):
    from hf_sinks.training.finetune import DistributedSetupError, check_world_size

    check_world_size(2, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedSetupError, match="start ONE process"):
        check_world_size(1, 2)  # the launcher started one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="do not train as one group.*use_cpu=True"):
        check_world_size(1, 2)  # two processes, each training alone
    with pytest.raises(ValueError, match="must be an int >= 1"):
        check_world_size(1, 0)
