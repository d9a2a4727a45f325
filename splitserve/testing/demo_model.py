"""Tiny models built locally: the built-in demo model and the test fixtures.

No machine reaches a model hub, so the demo model and every test model are made here:
a byte-level BPE tokenizer trained with `tokenizers` on text that ships with Python, and
random weights saved with `transformers.save_pretrained`.
"""

from __future__ import annotations

import json
import os
import pathlib
import pydoc
import shutil
from collections.abc import Iterator

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama-2-style template that writes BOS itself: the server must not add a second one.
BOS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {"tie_word_embeddings": False, "sliding_window": None},
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"tie_word_embeddings": True, "use_sliding_window": False},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"tie_word_embeddings": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"tie_word_embeddings": False}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"tie_word_embeddings": False}),
}
"""build_model's arch -> (transformers config class, model class, default config fields)."""


def _corpus() -> Iterator[str]:
    """English text that ships with Python: module docs and the Zen of Python."""
    import codecs
    import contextlib
    import importlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # `this` prints the Zen on import
        this = importlib.import_module("this")
    yield codecs.decode(this.s, "rot13")
    for name in [
        "json",
        "pathlib",
        "collections",
        "itertools",
        "functools",
        "re",
        "argparse",
        "logging",
        "dataclasses",
        "typing",
        "asyncio",
        "os",
        "string",
        "textwrap",
        "unittest",
        "random",
        "statistics",
        "math",
        "datetime",
    ]:
        try:
            yield pydoc.render_doc(name, renderer=pydoc.plaintext)
        except Exception:  # a module without docs is just skipped
            continue
    yield "Héllo wörld, ça va? Grüße! 你好，世界。 こんにちは 🙂🚀 naïve café"


def build_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    chat_template: str = CHATML_TEMPLATE,
    add_bos: bool = False,
    with_bos_token: bool = True,
) -> pathlib.Path:
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if with_bos_token else None,
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


def build_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    rope_parameters: dict | None = None,
    extra_vocab: int = 0,
    eos_token_ids: list[int] | None = None,
    seed: int = 0,
    initializer_range: float = 0.2,
    tokenizer_kwargs: dict | None = None,
    dtype: str = "float32",
    **config_kwargs,
) -> pathlib.Path:
    """Save a tiny random checkpoint of `arch` (one of `ARCHS`) with its tokenizer.

    `extra_vocab` pads the embedding past the tokenizer (as real checkpoints do).
    `eos_token_ids` goes to generation_config.json (several EOS ids, as Llama 3 has).
    `config_kwargs` are further config fields (attention_bias, num_experts, norm_topk_prob,
    mlp_only_layers, ...); the MoE archs default to 4 experts, top-2.
    """
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    tok_dir = build_tokenizer(out, vocab_size=vocab_size, **(tokenizer_kwargs or {}))
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    n_vocab = len(tok) + extra_vocab
    common = dict(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if rope_parameters is not None:
        common["rope_parameters"] = rope_parameters
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    config_name, model_name, defaults = ARCHS[arch]
    fields = {**defaults, **common, **config_kwargs}
    if arch in ("llama", "mistral", "qwen3", "qwen3_moe", "gpt_oss"):
        fields["head_dim"] = head_dim or hidden_size // num_heads
    if arch in ("mixtral", "qwen3_moe", "gpt_oss"):
        if not {"num_experts", "num_local_experts"} & fields.keys():
            fields["num_local_experts"] = 4
        fields.setdefault("num_experts_per_tok", 2)
    if arch == "qwen3_moe":
        fields.setdefault("moe_intermediate_size", intermediate_size // 2)
    if tie_word_embeddings is not None:
        fields["tie_word_embeddings"] = tie_word_embeddings
    cfg = getattr(transformers, config_name)(**fields)
    cls = getattr(transformers, model_name)
    torch.manual_seed(seed)
    model = cls(cfg).to(getattr(torch, dtype))
    model.eval()
    model.save_pretrained(out)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    if eos_token_ids is not None:
        gen["eos_token_id"] = eos_token_ids
    gen_path.write_text(json.dumps(gen, indent=2))
    return out


DEMO_SIZES = dict(
    vocab_size=2000,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
)


DEMO_DIR = "demo-llama-v2"
"""The demo model's folder under the cache (compose/docker-compose.yml names it too)."""

DEMO_MAX_NEW_TOKENS = 32
"""generation_config.json's max_new_tokens for the demo model. Its random weights never
sample EOS, so without this cap a chat that gives no max_tokens would run to the end of the
context (minutes on a laptop CPU); as in vLLM the file's value bounds every request."""


def demo_model_path() -> pathlib.Path:
    """Build the built-in demo model once and return its folder (cached on disk)."""
    root = pathlib.Path(
        os.environ.get("SPLITSERVE_CACHE", pathlib.Path.home() / ".cache" / "splitserve")
    )
    path = root / DEMO_DIR
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    tmp = root / f".demo-build-{os.getpid()}"
    build_model(tmp, "llama", initializer_range=0.05, **DEMO_SIZES)
    gen_path = tmp / "generation_config.json"
    gen_path.write_text(
        json.dumps({**json.loads(gen_path.read_text()), "max_new_tokens": DEMO_MAX_NEW_TOKENS})
    )
    if path.exists():  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(path)
    return path
