"""Random peft LoRA adapters and their transformers + peft greedy outputs (the oracle)."""

from __future__ import annotations

import torch


def make_adapter(base_path, out_dir, targets, r, alpha, seed, use_rslora=False, fmt="st"):
    """A random peft LoRA adapter for the checkpoint at base_path, saved to out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out_dir, safe_serialization=(fmt == "st"))
    return out_dir


def peft_greedy(base_path, adapter_dir, prompts, max_tokens):
    """Greedy tokens of transformers (+ peft adapter when given), prompt by prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

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
