"""``import hf_sinks`` registers its attention names before any model exists, whatever the import order.

``import hf_sinks`` imports neither torch nor transformers (hf_sinks/registration.py): the registration runs at once
when transformers' modeling code is already imported, else right after it is. Each order runs in a fresh
interpreter, since an import happens once per process.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What each order must end with: a tiny Llama built with attn_implementation="sink_sdpa", and every name registered.
CHECK = """
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
import hf_sinks.registration as registration
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM._from_config(config, attn_implementation="sink_sdpa")
assert model.config._attn_implementation == "sink_sdpa"
names = ("sink_sdpa", "sink_eager", "sink_flex", "sink_triton", "h2o_sdpa", "duo_sdpa")
registries = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
missing = [n for n in names if any(n not in registry for registry in registries)]
assert not missing, missing
assert registration.pending("hf_sinks") is None  # the finder left sys.meta_path
print("ok")
"""

ORDERS = {
    # the README's order: hf_sinks, then transformers' model code (the finder registers after it executed)
    "hf_sinks_then_transformers": "import hf_sinks\nfrom transformers import AutoModelForCausalLM\n",
    # transformers' model code already imported: registered at once
    "transformers_then_hf_sinks": "import transformers.models.llama.modeling_llama\nimport hf_sinks\n"
    "from transformers import AttentionInterface\nassert 'sink_sdpa' in AttentionInterface._global_mapping\n",
    # a submodule of ours imports transformers' model code while it initializes: the registration waits for it
    "our_submodule_first": "import hf_sinks.attention.functions\n",
    # a public name completes it without any model import
    "public_name": "import hf_sinks\nhf_sinks.SinkCache\nimport hf_sinks.registration as r\n"
    "assert r.pending('hf_sinks') is None\n",
}


def test_registered_before_any_model_exists():
    """Every order of :data:`ORDERS`, each in its own interpreter (run side by side: each spends its time importing
    transformers)."""
    runs = {
        order: subprocess.Popen(
            [sys.executable, "-c", code + CHECK], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for order, code in ORDERS.items()
    }
    failed = {}
    for order, run in runs.items():
        out, err = run.communicate(timeout=300)
        if run.returncode != 0 or not out.strip().endswith("ok"):
            failed[order] = err[-2000:]
    assert not failed, "\n".join(f"[{order}]\n{err}" for order, err in failed.items())


def test_the_import_alone_touches_nothing():
    """Before transformers' modeling code is imported, ``import hf_sinks`` has registered nothing and imported no
    torch: the finder waits in ``sys.meta_path``."""
    code = (
        "import sys, hf_sinks, hf_sinks.registration as r\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "assert r.pending('hf_sinks') is not None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
