"""``finetune``: sink-aware LoRA fine-tuning on transformers' ``Trainer``; ``load_finetuned``: reload + merge.

Built on ``Trainer`` + ``TrainingArguments`` so that the same call runs on one CPU, one GPU, or under
``accelerate launch`` with DDP / FSDP / DeepSpeed (all configured through ``TrainingArguments`` / the accelerate
config; ``trainer.save_model`` gathers sharded weights before saving). What ``output_dir`` holds afterwards:

* ``adapter_model.safetensors`` + ``adapter_config.json``: LoRA weights plus every other trained tensor
  (embeddings / norms via ``modules_to_save``, the sink-token row via ``trainable_token_indices``, learned sink
  logits), written by PEFT;
* ``hf_sinks_recipe.json``: the recipe (sink token, streaming setup, rope scaling, learned sinks) that
  :func:`load_finetuned` replays on a fresh base model;
* the tokenizer (with the sink token, if any);
* ``loss.csv`` and ``loss.png``: the training loss per logged step.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compat import checkpointing_kwargs_name, checkpointing_training_args
from ..config import CONFIG_ATTRIBUTE
from ..validation import check_int
from .data import PackedDataset, tokenize_text
from .recipes import SinkRecipe, attention_is_registered, forget_dequantized_gguf, lora_recipe, saved_modules_to_save

logger = logging.getLogger(__name__)

RECIPE_FILE = "hf_sinks_recipe.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced.

    Attributes:
        model: the trained ``PeftModel`` (eval mode; unmerged).
        recipe: the :class:`SinkRecipe` used.
        output_dir: where the adapter, recipe, tokenizer and loss files were written.
        log_history: one dict per logged step (``step``, ``loss``, ``learning_rate``, ``grad_norm``, ...).
        train_rows: number of packed training sequences available.
    """

    model: Any
    recipe: SinkRecipe
    output_dir: Path
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_rows: int = 0

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.log_history if "loss" in row]


def _loss_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: row.get(k) for k in ("step", "epoch", "loss", "learning_rate", "grad_norm")}
        for row in log_history
        if "loss" in row
    ]


def write_loss_csv(log_history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the logged training losses (``step, epoch, loss, learning_rate, grad_norm``) as CSV."""
    path = Path(path)
    rows = _loss_rows(log_history)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss", "learning_rate", "grad_norm"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_loss(
    log_history: list[dict[str, Any]], path: str | os.PathLike, title: str = "training loss", smooth: int = 20
) -> Path | None:
    """Loss-curve PNG (raw per-step loss and a running mean over ``smooth`` steps). ``None`` without matplotlib."""
    from ..eval.plots import pyplot, save_figure

    try:
        plt = pyplot()
    except ImportError:
        logger.warning("matplotlib is not installed; no loss plot (pip install matplotlib).")
        return None
    rows = _loss_rows(log_history)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    if len(losses) >= 2 and smooth > 1:
        window = min(smooth, len(losses))
        running = [
            sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))
        ]
        ax.plot(steps, running, lw=2, label=f"running mean ({window} logs)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: SinkRecipe | str = "sinklora",
    text: Any = None,
    seq_len: int = 512,
    max_steps: int = 200,
    learning_rate: float = 2e-4,
    output_dir: str | os.PathLike = "hf_sinks_finetune",
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    warmup_steps: int = 20,
    lr_scheduler_type: str = "constant_with_warmup",
    weight_decay: float = 0.0,
    logging_steps: int = 1,
    seed: int = 0,
    max_rows: int | None = None,
    progress: bool = True,
    plot: bool = True,
    training_args: dict[str, Any] | None = None,
    max_train_seconds: float | None = None,
    expected_world_size: int | None = None,
    **recipe_kwargs: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` with a sink-aware LoRA recipe on ``text`` and save everything to ``output_dir``.

    Args:
        model: a supported causal LM (not yet wrapped by PEFT), or the ``PeftModel`` returned by ``recipe.apply``.
        tokenizer: its tokenizer (the ``sink_token`` recipe adds its token to it).
        recipe: a :class:`SinkRecipe`, or a recipe name for :func:`lora_recipe` (with ``**recipe_kwargs``).
        text: training text: token ids, a text file, a string, or ``None`` for the default text
            (see :func:`hf_sinks.training.data.tokenize_text`). Packed into ``seq_len`` rows.
        seq_len: tokens per training sequence (sink token included).
        max_steps: optimizer steps (cycles over the rows if needed).
        learning_rate, warmup_steps, lr_scheduler_type, weight_decay: optimizer schedule (LongLoRA: constant with
            20 warm-up steps, no weight decay; 2e-5 for full 7B runs, LoRA on small models likes ~1e-4 to 1e-3).
        per_device_train_batch_size, gradient_accumulation_steps: batch shape per optimizer step.
        logging_steps: log (and record in ``loss.csv``) every this many steps.
        seed: ``TrainingArguments(seed=...)``, also used for the data order.
        max_rows: use at most this many packed rows.
        progress: tqdm progress bar (Trainer's).
        plot: write ``loss.png`` (needs matplotlib).
        training_args: extra ``TrainingArguments`` keywords (e.g. ``{"bf16": True, "gradient_checkpointing":
            True, "deepspeed": "ds.json", "fsdp": "full_shard"}``); they override the arguments above.
        max_train_seconds: stop (and save) after the step that crosses this wall-clock budget, even before
            ``max_steps`` (the steps actually done are in ``log_history`` / ``loss.csv``).
        expected_world_size: the number of processes the launch was meant to start. Checked against the world
            ``Trainer`` really trains on, before any training: a launch that silently starts one process per
            command (``accelerate launch --cpu --num_processes 2``) or processes that each train alone (a
            ``torchrun`` launch whose processes never joined a process group) raises instead of training.
        **recipe_kwargs: passed to :func:`lora_recipe` when ``recipe`` is a name.

    Returns:
        a :class:`FinetuneResult`.

    Raises:
        DistributedSetupError: (a ``RuntimeError``) ``expected_world_size`` is given and differs from the world size
            ``Trainer`` got, or FSDP / DeepSpeed was asked for (accelerate config or ``training_args``) and
            ``Trainer`` would not use it (accelerate ignores both for CPU processes). Raised before any training.

    Without a GPU (or another accelerator) ``use_cpu=True`` is the default training argument, so that
    ``torchrun --nproc_per_node N`` on CPU trains data-parallel over gloo; without it each process would
    train on its own (accelerate picks no backend for CPU processes unless told to use the CPU).
    """
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments, default_data_collator

    output_dir = Path(output_dir)
    args = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler_type,
        weight_decay=weight_decay,
        adam_beta2=0.95,  # LongLoRA's AdamW betas (0.9, 0.95)
        logging_steps=logging_steps,
        save_strategy="no",  # one save at the end, through save_model (gathers FSDP/DeepSpeed shards)
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if not accelerator_available():
        args["use_cpu"] = True  # CPU processes join a gloo process group under torchrun / accelerate launch
    args.update(training_args or {})
    args = checkpointing_training_args(args)  # gradient_/activation_checkpointing: this release's name, never False
    if args.get("activation_checkpointing") or args.get("gradient_checkpointing"):
        # Non-reentrant checkpointing needs no input that requires grad (LoRA inputs from frozen embeddings do not).
        args.setdefault(checkpointing_kwargs_name(), {"use_reentrant": False})
    training_arguments = TrainingArguments(**args)
    if expected_world_size is not None:
        check_world_size(training_arguments.world_size, expected_world_size)

    if isinstance(model, PeftModel):
        peft_model = model
        recipe = getattr(model, "sink_recipe", recipe)
        if not isinstance(recipe, SinkRecipe):
            raise ValueError("A PeftModel passed to finetune must come from SinkRecipe.apply (it has no .sink_recipe).")
    else:
        if isinstance(recipe, str):
            recipe = lora_recipe(model, recipe, tokenizer=tokenizer, **recipe_kwargs)
        elif recipe_kwargs:
            raise ValueError(f"recipe keyword arguments {sorted(recipe_kwargs)} only apply when recipe is a name.")
        peft_model = recipe.apply(model)

    dataset = PackedDataset(
        tokenize_text(tokenizer, text), seq_len, sink_token_id=recipe.sink_token_id, max_rows=max_rows
    )
    trainer = Trainer(
        model=peft_model,
        args=training_arguments,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[_TimeBudget(max_train_seconds)] if max_train_seconds else None,
    )
    check_engine(trainer, args)
    if not progress:  # no per-step log dicts on stdout either (Trainer prints them when tqdm is off)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    peft_model.eval()
    history = list(trainer.state.log_history)
    save_finetuned(trainer, tokenizer, recipe, output_dir, history, plot=plot)
    return FinetuneResult(
        model=peft_model, recipe=recipe, output_dir=output_dir, log_history=history, train_rows=len(dataset)
    )


def accelerator_available() -> bool:
    """Whether torch sees a GPU (or another accelerator ``Trainer`` would train on) in this process."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


class DistributedSetupError(RuntimeError):
    """The launch asked for a distributed setup that training did not get (world size, FSDP, DeepSpeed)."""


def check_world_size(got: int, expected: int) -> None:
    """Raise :class:`DistributedSetupError` unless ``got`` (the processes training together) is ``expected``."""
    check_int("expected_world_size", expected, 1)
    if got == expected:
        return
    env = {k: os.environ[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU") if k in os.environ}
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == expected:
        why = (
            f"the launcher started {launched} processes but they do not train as one group: without a GPU they "
            "join a gloo group only with TrainingArguments(use_cpu=True), which finetune() sets when no "
            "accelerator is visible; check training_args and the accelerate config."
        )
    else:
        why = (
            "`accelerate launch --cpu --num_processes N` and a config with `distributed_type: MULTI_CPU` start ONE "
            "process unless an MPI hostfile is given; on CPU launch with `torchrun --nproc_per_node N` or "
            "`accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml`."
        )
    raise DistributedSetupError(
        f"hf_sinks: expected a world of {expected} training process(es), got {got} "
        f"(launcher environment: {env or 'none'}). {why}"
    )


def check_engine(trainer: Any, training_args: dict[str, Any]) -> None:
    """Raise :class:`DistributedSetupError` when FSDP or DeepSpeed was asked for but ``trainer`` will not use it.

    Asked for: by ``accelerate launch`` with an FSDP / DeepSpeed config (``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED`` in the environment) or by ``training_args`` (``fsdp`` / ``deepspeed``). accelerate
    (1.x) enables FSDP only for accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...) and leaves CPU
    processes (``MULTI_CPU``, gloo) in plain DDP, silently; this turns that into an error before training.
    """
    import accelerate

    def flag(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    for engine, asked, enabled in (
        (
            "FSDP",
            flag("ACCELERATE_USE_FSDP") or bool(training_args.get("fsdp")),
            getattr(trainer, "is_fsdp_enabled", False),
        ),
        (
            "DeepSpeed",
            flag("ACCELERATE_USE_DEEPSPEED") or bool(training_args.get("deepspeed")),
            getattr(trainer, "is_deepspeed_enabled", False),
        ),
    ):
        if asked and not enabled:
            distributed_type = trainer.accelerator.state.distributed_type
            raise DistributedSetupError(
                f"hf_sinks: {engine} was requested but accelerate {accelerate.__version__} did not enable it "
                f"(distributed type {distributed_type.value}, device {trainer.args.device}). accelerate turns "
                "FSDP/DeepSpeed on only for accelerator process groups (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...), never "
                "for CPU processes (MULTI_CPU over gloo), which would train plain DDP instead. Run it on GPUs, or use "
                "data parallelism on CPU (examples/accelerate_configs/multi_cpu.yaml); see docs/scaling_out.md."
            )


def _TimeBudget(seconds: float):
    import time

    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stops training after the step that crosses ``seconds`` of wall-clock time."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds:
                logger.warning(
                    "hf_sinks: time budget of %.0f s reached at step %d; stopping.", seconds, state.global_step
                )
                control.should_training_stop = True
            return control

    return TimeBudget()


def save_finetuned(
    trainer: Any, tokenizer: Any, recipe: SinkRecipe, output_dir: Path, log_history: list[dict], plot: bool = True
) -> None:
    """Adapter (safetensors, ``trainer.save_model``: shard-gathering, main process only), recipe, tokenizer, loss."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with _embedding_layers_saved(trainer, auto=not _resize_is_replayed(recipe)):
        trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return
    recipe.to_json_file(output_dir / RECIPE_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))
    write_loss_csv(log_history, output_dir / LOSS_CSV)
    if plot:
        plot_loss(log_history, output_dir / LOSS_PNG, title=f"{recipe.recipe}: training loss")


def _resize_is_replayed(recipe: SinkRecipe) -> bool:
    """Whether :func:`load_finetuned` rebuilds every embedding row the recipe added, so the adapter need not hold them.

    The ``sink_token`` recipe is the only one that resizes the embeddings, and :func:`load_finetuned` replays that
    resize with :func:`~hf_sinks.training.sink_token.resize_for_sink_token`, deterministically; the trained sink row
    itself is saved as PEFT's ``trainable_tokens_delta`` (the row's value, not a difference to the base row).
    """
    return recipe.sink_token_id is not None


@contextmanager
def _embedding_layers_saved(trainer: Any, auto: bool) -> Iterator[None]:
    """Within the block, ``trainer``'s model saves with PEFT's ``save_embedding_layers="auto"`` (``auto``) or ``False``.

    Why ``False`` after the ``sink_token`` resize: ``"auto"`` compares the vocabulary with the base model's
    ``config.json`` (found only when the base was loaded from a directory or the Hub) and then writes both full
    embedding matrices into the adapter (the whole vocabulary, twice with a tied ``lm_head``) with a warning at save,
    and with them the tied ``lm_head``'s token delta, which PEFT 0.22 ties to the input embedding's own and reports as
    an "unexpected adapter key" at load. ``Trainer.save_model`` forwards no keyword to ``save_pretrained`` (it calls it
    itself, after gathering FSDP/DeepSpeed shards), so the instance's method is wrapped for the call, on the model as
    ``Trainer`` holds it and unwrapped (``Trainer`` calls one or the other).
    """
    if auto:
        yield
        return
    models = {id(m): m for m in (trainer.model, trainer.accelerator.unwrap_model(trainer.model))}.values()
    patched = [m for m in models if callable(getattr(m, "save_pretrained", None))]
    for model in patched:
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    try:
        yield
    finally:
        for model in patched:
            del model.save_pretrained  # the instance attribute: the class's method shows through again


def load_recipe(path: str | os.PathLike) -> SinkRecipe:
    """The :class:`SinkRecipe` saved by :func:`finetune` in ``path`` (its ``lora_config`` is ``None``)."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(file)!r} not found: {str(path)!r} is not an hf_sinks fine-tune output directory."
        )
    with open(file, encoding="utf-8") as f:
        return SinkRecipe.from_dict(json.load(f))


def load_finetuned(
    base_model: torch.nn.Module,
    path: str | os.PathLike,
    merge: bool = True,
    is_trainable: bool = False,
    attn_implementation: str | None = "auto",
):
    """Reload a :func:`finetune` output onto a fresh ``base_model`` (same weights it was trained from).

    Replays the recipe's structural changes (sink-token row, learned sink modules, rope scaling), loads the adapter
    with ``PeftModel.from_pretrained`` and, with ``merge=True``,
    ``merge_and_unload()``s it into a plain transformers model. The streaming setup is recorded in
    ``model.config.attention_sinks``, so ``hf_sinks.apply(model)`` streams with the recipe's sinks (e.g. one
    sink for ``sink_token``; prepend the token with :func:`hf_sinks.training.prepend_sink_token`, the tokenizer
    saved in ``path`` knows it).

    Args:
        attn_implementation: attention of the returned model. ``"auto"``: unchanged, except with learned sink
            logits, where the recipe's training attention (e.g. ``sink_sfattn``, plain causal attention + the
            learned logits outside training) is set when registered, because ``sdpa``/``eager`` ignore them.
            ``None``: unchanged; a name: set it (not for Falcon).

    Returns:
        the merged model (``merge=True``) or the ``PeftModel``, in eval mode.
    """
    from peft import PeftConfig, PeftModel

    recipe = load_recipe(path)
    forget_dequantized_gguf(base_model)
    if recipe.rope_scaling is not None:
        from .rope_scaling import set_rope_scaling

        set_rope_scaling(base_model, recipe.rope_scaling)
    if recipe.sink_token_id is not None:
        from .sink_token import resize_for_sink_token

        resize_for_sink_token(base_model, recipe.sink_token_id)
    if recipe.learned_sink_logits:
        from .learned_sinks import add_learned_sinks

        add_learned_sinks(base_model, recipe.learned_sink_init)
    setattr(base_model.config, CONFIG_ATTRIBUTE, recipe.sink_config.to_dict())
    if attn_implementation == "auto":
        wanted = recipe.attn_implementation if recipe.learned_sink_logits else None
        attn_implementation = wanted if wanted is not None and attention_is_registered(wanted) else None
    if attn_implementation is not None and base_model.config._attn_implementation != attn_implementation:
        base_model.set_attn_implementation(attn_implementation)
    config = PeftConfig.from_pretrained(str(path))
    config.modules_to_save = saved_modules_to_save(base_model, path, config.modules_to_save)  # older adapters
    peft_model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable, config=config)
    model = peft_model.merge_and_unload() if merge else peft_model
    return model.eval()


__all__ = [
    "FinetuneResult",
    "LOSS_CSV",
    "LOSS_PNG",
    "RECIPE_FILE",
    "DistributedSetupError",
    "accelerator_available",
    "check_engine",
    "check_world_size",
    "finetune",
    "load_finetuned",
    "load_recipe",
    "plot_loss",
    "save_finetuned",
    "write_loss_csv",
]
