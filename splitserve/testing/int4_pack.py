"""An int4 packer for tests and benchmarks, written apart from the worker's loader.

`pack_checkpoint` turns an unquantized safetensors folder into a 4-bit checkpoint of one of
`FORMATS` (the decoder layers' projections quantized per group of input features; embeddings,
norms and lm_head kept) and writes, beside it, the same model on the dequantized weights as a
plain checkpoint, which transformers loads as the parity reference.

- "awq": AutoAWQ's GEMM layout: `qweight` int32 [K, N / 8] (8 output columns a word, nibble i
  holding column AWQ_ORDER[i]), `qzeros` int32 [K / g, N / 8] packed alike, fp16 `scales`
  [K / g, N]; asymmetric (zero point per group).
- "w4a16", "w4a16-asym", "w4a16-channel": compressed-tensors `pack-quantized` (what
  llm-compressor writes): `weight_packed` int32 [N, K / 8] (8 consecutive inputs a word, the
  signed value + 8 in nibble i for input 8c + i), `weight_scale` [N, K / g] (or [N, 1] per
  channel), `weight_shape`, and for the asymmetric scheme `weight_zero_point` int32
  [N / 8, K / g] packed along the outputs.

The bit packing here is a plain numpy loop over words, deliberately not the worker's code.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's nibble order: nibble i of a word holds column AWQ_ORDER[i] of its 8."""
LINEAR_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
    r"|(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3))\.weight$"
)
"""The tensors packed: attention and MLP projections, and each expert's (not the router)."""


def quantize(
    w: torch.Tensor, group: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of w [N, K] per group of `group` inputs.

    Returns (q int32 [N, K] in 0..15, zeros int32 [N, K / group] in 0..15, scales [N, K / group]
    in `scale_dtype`); the real weight is (q - zero) * scale. Symmetric: zero 8, scale
    absmax / 7.5 (q - 8 in [-8, 7]); asymmetric: the group's [min, max] over 15 steps.
    """
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    if symmetric:
        scales = (groups.abs().amax(dim=-1) / 7.5).clamp(min=1e-6).to(scale_dtype)
        zeros = torch.full(scales.shape, 8, dtype=torch.int32)
    else:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-6).to(scale_dtype)
        zeros = torch.round(-lo / scales.float()).clamp(0, 15).to(torch.int32)
    q = torch.round(groups / scales.float()[..., None]) + zeros[..., None]
    return q.clamp(0, 15).to(torch.int32).reshape(n, k), zeros, scales


def dequant(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The real float32 weight [N, K] of `quantize`'s output, group by group."""
    n, k = q.shape
    group = k // zeros.shape[1]
    diff = (q - zeros.repeat_interleave(group, dim=1)).float()
    return diff * scales.float().repeat_interleave(group, dim=1)


def pack_words(values: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """uint [R, 8C] in 0..15 -> int32 [R, C]: nibble i of word c holds value 8c + order[i]."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    for c in range(cols // 8):
        for i, column in enumerate(order):
            out[:, c] |= values[:, 8 * c + column].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def _torch_words(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    return torch.from_numpy(pack_words(values.numpy(), order))


def pack_awq(w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(AutoAWQ tensors {qweight, qzeros, scales}, dequantized weight [N, K]) of w [N, K]."""
    q, zeros, scales = quantize(w, group, symmetric=False)
    tensors = {
        "qweight": _torch_words(q.t().contiguous(), AWQ_ORDER),
        "qzeros": _torch_words(zeros.t().contiguous(), AWQ_ORDER),
        "scales": scales.t().contiguous(),
    }
    return tensors, dequant(q, zeros, scales)


def pack_ct(
    w: torch.Tensor, group: int | None, symmetric: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(compressed-tensors pack-quantized tensors, dequantized weight [N, K]) of w [N, K];
    group None: one scale per output channel."""
    n, k = w.shape
    q, zeros, scales = quantize(w, group or k, symmetric, scale_dtype=torch.bfloat16)
    tensors = {
        "weight_packed": _torch_words(q),
        "weight_scale": scales,
        "weight_shape": torch.tensor([n, k]),
    }
    if not symmetric:
        tensors["weight_zero_point"] = _torch_words(zeros.t().contiguous()).t().contiguous()
    return tensors, dequant(q, zeros, scales)


def ct_scheme(group: int | None, symmetric: bool):
    """The compressed-tensors W4A16 scheme (weights only, activations unquantized)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False}
    if group:
        weights.update(strategy="group", group_size=group)
    else:
        weights["strategy"] = "channel"
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))


def ct_config(group: int | None, symmetric: bool) -> dict:
    """config.json's quantization_config of that scheme, as compressed-tensors writes it."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": ct_scheme(group, symmetric)},
        format="pack-quantized",
        ignore=["lm_head"],
        quantization_status="compressed",
    ).model_dump()


def awq_config(group: int) -> dict:
    """config.json's quantization_config of an AutoAWQ GEMM checkpoint."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


FORMATS = {
    "awq": (lambda g: awq_config(g), lambda w, g: pack_awq(w, g)),
    "w4a16": (lambda g: ct_config(g, True), lambda w, g: pack_ct(w, g, True)),
    "w4a16-asym": (lambda g: ct_config(g, False), lambda w, g: pack_ct(w, g, False)),
    "w4a16-channel": (lambda g: ct_config(None, True), lambda w, g: pack_ct(w, None, True)),
}
"""name -> (quantization_config(group), pack(weight, group) -> (tensors, dequantized))."""


def pack_checkpoint(
    src: pathlib.Path, out: pathlib.Path, fmt: str, group: int = 32
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `out` (the int4 checkpoint of `src` in format `fmt`) and `out`-dense (the same model
    on its dequantized weights, unquantized); returns both folders. Every file of `src` but its
    weights and config (tokenizer, generation config) is copied along."""
    from safetensors.torch import load_file, save_file

    make_config, pack = FORMATS[fmt]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    quant, dense = dict(state), dict(state)
    for key, w in state.items():
        if LINEAR_RE.match(key):
            tensors, deq = pack(w, group)
            base = key.removesuffix("weight")
            del quant[key]
            quant.update({base + name: t for name, t in tensors.items()})
            dense[key] = deq.to(w.dtype)
    dense_out = out.with_name(out.name + "-dense")
    config = json.loads((src / "config.json").read_text())
    for folder, tensors, qconfig in ((out, quant, make_config(group)), (dense_out, dense, None)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        written = dict(config, quantization_config=qconfig) if qconfig else config
        (folder / "config.json").write_text(json.dumps(written))
        save_file(tensors, folder / "model.safetensors")
    return out, dense_out
