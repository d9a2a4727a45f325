"""peft adapters that add tokens (resized embeddings), in the three layouts splitserve reads,
and their transformers + peft greedy outputs on the resized base (the oracle)."""

from __future__ import annotations

import json

import torch

ADDED_TOKEN = "<extra_{}>"
"""Text of the adapter tokenizer's added token j (id V + j)."""
SCALE = 4.0
"""Added lm_head rows are this many times a typical row: large enough that they win argmaxes."""


def _resized_base(base_path, k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    v = model.config.vocab_size
    model.resize_token_embeddings(v + k, mean_resizing=False)
    return model, v


def _big_rows(like: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(k, like.shape[1], generator=gen) * like.std() * SCALE


def make_vocab_adapter(base_path, out_dir, k, layout, seed, targets=("q_proj", "v_proj")):
    """A peft LoRA adapter adding k tokens to the checkpoint at base_path, saved to out_dir.

    layout: "tti" (trainable_token_indices, list form), "tti_dict" (embed_tokens and lm_head),
    "mts" (modules_to_save embed_tokens + lm_head), "new_embeddings" (new_embeddings.safetensors
    beside a plain adapter).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, v = _resized_base(base_path, k)
    ids = list(range(v, v + k))
    kwargs: dict = {}
    if layout == "tti":
        kwargs["trainable_token_indices"] = ids
    elif layout == "tti_dict":
        kwargs["trainable_token_indices"] = {"embed_tokens": ids, "lm_head": ids}
    elif layout == "mts":
        kwargs["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif layout != "new_embeddings":
        raise ValueError(layout)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, **kwargs)
    if layout == "new_embeddings":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "trainable_tokens_delta" in name:
                p.copy_(_big_rows(emb, k, gen))
            elif "modules_to_save" in name:
                p[v:] = _big_rows(emb, k, gen)
    peft_model.save_pretrained(out_dir)
    if layout == "new_embeddings":
        from safetensors.torch import save_file

        save_file(
            {
                "input_embeddings": _big_rows(emb, k, gen).contiguous(),
                "output_embeddings": _big_rows(emb, k, gen).contiguous(),
            },
            str(out_dir / "new_embeddings.safetensors"),
        )
    return out_dir


def peft_vocab_greedy(base_path, adapter_dir, k, prompts, max_tokens):
    """Greedy tokens of transformers + peft on the base resized to V + k (the adapter's rows
    loaded over the new rows), prompt by prompt."""
    from peft import PeftModel

    model, v = _resized_base(base_path, k)
    weights = adapter_dir / "new_embeddings.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        rows = load_file(str(weights))
        with torch.no_grad():
            model.get_input_embeddings().weight[v:] = rows["input_embeddings"]
            model.get_output_embeddings().weight[v:] = rows["output_embeddings"]
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def base_vocab_size(base_path) -> int:
    return json.loads((base_path / "config.json").read_text())["vocab_size"]


def save_adapter_tokenizer(base_path, adapter_dir, k):
    """The base tokenizer plus k added tokens (ids V .. V+k-1), saved in the adapter folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    v = base_vocab_size(base_path)
    assert len(tok) == v, "added tokens take ids from len(tokenizer): it must equal V"
    tok.add_tokens([ADDED_TOKEN.format(j) for j in range(k)])
    assert tok.convert_tokens_to_ids(ADDED_TOKEN.format(k - 1)) == v + k - 1
    tok.save_pretrained(str(adapter_dir))


def peft_vocab_prompt_logprobs(base_path, adapter_dir, k, ids):
    """log_softmax over V + k of transformers + peft at every prompt position: [len(ids), V+k]."""
    from peft import PeftModel

    model, _ = _resized_base(base_path, k)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
