"""An MXFP4 packer for tests and benchmarks (gpt-oss experts), written apart from the worker's
loader and kernels.

`pack_checkpoint` turns an unquantized gpt-oss safetensors folder into the layout OpenAI's
gpt-oss checkpoints ship (quant_method "mxfp4"): each layer's `mlp.experts.gate_up_proj`
[E, H, 2I] and `down_proj` [E, I, H] become `{proj}_blocks` uint8 [E, N, K / 32, 16] and
`{proj}_scales` uint8 [E, N, K / 32], rows N being the outputs (gate_up still interleaved
gate / up), 32 values per block along the inputs K: FP4 e2m1 codes, value 2j of a block in the
low nibble of byte j and 2j + 1 in the high one, with an E8M0 scale byte s = 127 + e, the
block's values being code * 2^e. Biases, attention, router, embeddings and lm_head stay as
they are. Beside it goes the same model on the dequantized weights, unquantized.

Rounding: e = ceil(log2(absmax / 6)) per block (so the largest value fits e2m1's 6), each
value to the nearest e2m1 value of x / 2^e (ties to the lower code), e clamped to [-127, 127].
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""Code -> value (bit 3 is the sign)."""
EXPERTS_RE = re.compile(r"^(?P<base>.+\.mlp\.experts\.(gate_up_proj|down_proj))$")
MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (K a multiple of 32) -> (blocks uint8 [..., N, K / 32, 16], scales uint8
    [..., N, K / 32])."""
    groups = w.double().unflatten(-1, (w.shape[-1] // 32, 32))
    amax = groups.abs().amax(dim=-1)
    exps = torch.tensor(
        [
            max(-127, min(127, math.ceil(math.log2(a / 6.0)))) if a > 0 else -127
            for a in amax.flatten().tolist()
        ],  # fmt: skip
        dtype=torch.float64,
    ).reshape(amax.shape)
    scaled = groups / torch.pow(2.0, exps).unsqueeze(-1)
    table = torch.tensor(E2M1[:8], dtype=torch.float64)
    magnitude = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)  # nearest, lower on ties
    codes = magnitude + 8 * ((scaled < 0) & (magnitude > 0))
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exps + 127).to(torch.uint8)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The packer's own inverse: -> float32 [..., N, K]."""
    table = torch.tensor(E2M1, dtype=torch.float64)
    low, high = table[(blocks & 15).long()], table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]
    values = values * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
    return values.flatten(-2).float()


def pack_checkpoint(
    src: pathlib.Path, out: pathlib.Path, dense_layers: tuple[int, ...] = ()
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `out` (the MXFP4 checkpoint of gpt-oss folder `src`) and `out`-dense (the same
    model on its dequantized weights); returns both folders. The experts of `dense_layers`
    stay unquantized and are listed in `modules_to_not_convert`."""
    from safetensors.torch import load_file, save_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    quant, dense = dict(state), dict(state)
    for key, w in state.items():
        if not EXPERTS_RE.match(key) or any(f".layers.{i}.mlp." in key for i in dense_layers):
            continue
        rows_out = w.transpose(1, 2)  # [E, N, K]: outputs as rows, as the format stores them
        blocks, scales = quantize(rows_out)
        del quant[key]
        quant[key + "_blocks"], quant[key + "_scales"] = blocks, scales
        dense[key] = dequantize(blocks, scales).transpose(1, 2).contiguous().to(w.dtype)
    dense_out = out.with_name(out.name + "-dense")
    config = json.loads((src / "config.json").read_text())
    skipped = [f"model.layers.{i}.mlp.experts" for i in dense_layers]
    qconfig = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED + skipped}
    for folder, tensors, q in ((out, quant, qconfig), (dense_out, dense, None)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        written = dict(config, quantization_config=q) if q else config
        (folder / "config.json").write_text(json.dumps(written))
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return out, dense_out
