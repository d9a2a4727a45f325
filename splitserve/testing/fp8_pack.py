"""An FP8 packer for tests and benchmarks, written apart from the worker's loader.

`pack_checkpoint` turns an unquantized safetensors folder into an FP8 checkpoint of one of
`FORMATS` (the decoder layers' projections quantized; embeddings, norms and lm_head kept) and
writes, beside it, the same model on the dequantized weights as a plain checkpoint, which
transformers loads as the parity reference. Dequantization here is a plain loop over blocks,
deliberately not the worker's code.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LINEAR_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
    r"|(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3))\.weight$"
)
"""The tensors packed: attention and MLP projections, and each expert's (not the router)."""
BLOCK = (16, 24)
"""Block of the block-wise formats: divides every fused shard of the tiny test models (16-row
multiples) and leaves ragged K blocks (in 32 or 64)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def pack(
    w: torch.Tensor, kind: str, block: tuple[int, int] = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) of a weight [N, K]: kind "channel" (scale [N, 1]),
    "tensor" (scale []) or "block" (scale [ceil(N/bn), ceil(K/bk)]), absmax -> 448."""
    w = w.float()
    if kind == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        return _to_fp8(w, scale), scale
    if kind == "tensor":
        scale = w.abs().max() / FP8_MAX
        return _to_fp8(w, scale), scale.reshape(())
    bn, bk = block
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8)
    scale = torch.empty(_cdiv(n, bn), _cdiv(k, bk))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            scale[i, j] = tile.abs().max() / FP8_MAX
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = _to_fp8(tile, scale[i, j])
    return q, scale


def dequant(
    q: torch.Tensor, scale: torch.Tensor, kind: str, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """The real float32 weight of `pack`'s output."""
    if kind != "block":
        return q.float() * scale
    bn, bk = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def ct_scheme(kind: str, block: tuple[int, int] = BLOCK, activations: str = "dynamic"):
    """The compressed-tensors FP8 scheme of layout `kind` (weights static; activations dynamic
    per token, as llm-compressor's FP8_DYNAMIC / FP8_BLOCK write, or "static": one calibrated
    per-tensor scale, as its FP8 scheme writes)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    weights["strategy"] = kind
    if kind == "block":
        weights["block_structure"] = list(block)
    static = activations == "static"
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(
            num_bits=8,
            type="float",
            strategy="tensor" if static else "token",
            dynamic=not static,
            symmetric=True,
        ),
    )


def ct_config(kind: str, block: tuple[int, int] = BLOCK, activations: str = "dynamic") -> dict:
    """config.json's quantization_config of that scheme, as compressed-tensors writes it."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": ct_scheme(kind, block, activations)},
        format="float-quantized",
        ignore=["lm_head"],
        quantization_status="compressed",
    ).model_dump()


FORMATS = {
    "fbgemm_fp8": (
        lambda block: {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
        "channel",
        "weight_scale",
        {"input_scale_ub": torch.tensor([1200.0])},
    ),
    "fp8-tensor": (
        lambda block: {"quant_method": "fp8", "activation_scheme": "static"},
        "tensor",
        "weight_scale",
        {"input_scale": torch.tensor(0.05)},
    ),
    "fp8-block": (
        lambda block: {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        },
        "block",
        "weight_scale_inv",
        {},
    ),
    "ct-channel": (lambda block: ct_config("channel", block), "channel", "weight_scale", {}),
    "ct-block": (lambda block: ct_config("block", block), "block", "weight_scale", {}),
    "ct-static": (
        lambda block: ct_config("tensor", block, "static"),
        "tensor",
        "weight_scale",
        {"input_scale": torch.tensor([0.05])},
    ),
}
"""name -> (quantization_config(block), layout, scale tensor name, extra per-layer tensors)."""


def pack_checkpoint(
    src: pathlib.Path, out: pathlib.Path, fmt: str, block: tuple[int, int] = BLOCK
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `out` (the FP8 checkpoint of `src` in format `fmt`) and `out`-dense (the same
    model on its dequantized weights, unquantized); returns both folders. Every file of `src`
    but its weights and config (tokenizer, generation config) is copied along."""
    from safetensors.torch import load_file, save_file

    make_config, kind, scale_name, extra = FORMATS[fmt]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    quant, dense = dict(state), dict(state)
    for key, w in state.items():
        if LINEAR_RE.match(key):
            q, scale = pack(w, kind, block)
            base = key.removesuffix("weight")
            quant[key], quant[base + scale_name] = q, scale
            for name, value in extra.items():
                quant[base + name] = value.clone()
            dense[key] = dequant(q, scale, kind, block).to(w.dtype)
    dense_out = out.with_name(out.name + "-dense")
    config = json.loads((src / "config.json").read_text())
    for folder, tensors, qconfig in ((out, quant, make_config(block)), (dense_out, dense, None)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        written = dict(config, quantization_config=qconfig) if qconfig else config
        (folder / "config.json").write_text(json.dumps(written))
        save_file(tensors, folder / "model.safetensors")
    return out, dense_out
