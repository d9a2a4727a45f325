"""Quantized checkpoints: which quant method each layer gets, from config.json's
`quantization_config` (as vLLM and transformers read it).

A `QuantConfig` is parsed from that dict (or built for `--quantization` on an unquantized
model) and hands each `Linear` its `LinearMethod` (`linear_method`); layers it leaves out
(lm_head, the format's ignore list) stay unquantized. `--quantization` only confirms the
checkpoint's format, or quantizes an unquantized model at load; a mismatch is a start-up error
naming both. Every check here runs on the meta-device skeleton, so preflight refuses a bad
format before any process starts or port opens.

Formats: fp8.py (`fp8`, `fbgemm_fp8`, and online `fp8`), compressed_tensors.py
(`compressed-tensors`: its FP8 schemes and W4A16 `pack-quantized`), awq.py (`awq`, AutoAWQ's
GEMM layout), mxfp4.py (`mxfp4`, gpt-oss's MoE experts); int4.py holds what the int4 formats
share.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

from torch import nn

from splitserve.worker.config import QUANTIZATION_METHODS
from splitserve.worker.linear import Linear, LinearMethod, MergedLinear

logger = logging.getLogger(__name__)


class QuantConfig:
    """One checkpoint format: parsed from `quantization_config`, it picks each layer's method."""

    name: ClassVar[str]
    """The `quant_method` value (and --quantization name)."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantConfig:
        """Parse config.json's `quantization_config`; ValueError names a bad field."""
        raise NotImplementedError

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        """The method of `layer` (its checkpoint module names: one, or one per fused shard);
        None keeps it unquantized."""
        raise NotImplementedError

    def moe_method(self, experts: nn.Module, name: str) -> Any:
        """The MoEExpertsMethod of the experts module `name`; None keeps them unquantized."""
        raise ValueError(f"{self.name} quantization of MoE experts ({name}) is not supported")

    def skips_tensor(self, name: str) -> bool:
        """Checkpoint tensors of the format that this build does not use (static activation
        scales on a weight-only path): dropped without a warning."""
        return False


def _registry() -> dict[str, type[QuantConfig]]:
    from splitserve.worker.quantization import awq, compressed_tensors, fp8, mxfp4

    formats = (
        fp8.Fp8Config,
        fp8.FbgemmFp8Config,
        compressed_tensors.CompressedTensorsConfig,
        awq.AwqConfig,
        mxfp4.Mxfp4Config,
    )
    configs = {c.name: c for c in formats}
    assert tuple(configs) == QUANTIZATION_METHODS, "worker.config lists the same formats"
    return configs


def resolve_quant_config(raw: dict[str, Any], flag: str | None) -> QuantConfig | None:
    """The model's QuantConfig from its config.json dict and --quantization, or None.

    Raises ValueError for an unknown `quant_method` (naming the supported list), for a
    --quantization that contradicts the checkpoint (naming both), and for a format flag on an
    unquantized model that cannot be quantized at load.
    """
    registry = _registry()
    hf = raw.get("quantization_config")
    if hf is None and isinstance(raw.get("text_config"), dict):
        hf = raw["text_config"].get("quantization_config")
    supported = ", ".join(QUANTIZATION_METHODS)
    if hf is not None:
        method = hf.get("quant_method") if isinstance(hf, dict) else None
        if method not in registry:
            raise ValueError(
                f"config.json's quantization_config has quant_method {method!r}, which "
                f"splitserve does not load; supported: {supported}"
            )
        if flag is not None and flag != method:
            raise ValueError(
                f"--quantization {flag} does not match the checkpoint, whose config.json "
                f"quantization_config says quant_method {method!r}; drop the flag or pass "
                f"--quantization {method}"
            )
        return registry[method].from_config(hf)
    if flag is None:
        return None
    if flag != "fp8":
        raise ValueError(
            f"--quantization {flag} needs a checkpoint saved in that format, but config.json "
            "has no quantization_config; an unquantized model can be quantized at load with "
            "--quantization fp8 only"
        )
    from splitserve.worker.quantization.fp8 import Fp8Config

    return Fp8Config(serialized=False)


def checkpoint_names(module_name: str, module: nn.Module, packed: dict[str, tuple[str, str]]):
    """The checkpoint module names a layer is loaded from (q_proj, k_proj, v_proj for a fused
    qkv_proj)."""
    if not isinstance(module, MergedLinear):
        return [module_name]
    head, _, leaf = module_name.rpartition(".")
    prefix = f"{head}." if head else ""
    names = [prefix + ckpt for ckpt, (fused, _) in packed.items() if fused == leaf]
    return names or [module_name]


def apply_quant_config(model: nn.Module, config: QuantConfig) -> None:
    """Give every `Linear` of `model` (built on the meta device, not loaded) its quant method.

    lm_head stays unquantized (as in vLLM); MoE experts get the format's experts method. Raises ValueError naming the layer when the format cannot hold it.
    """
    from splitserve.worker.moe import MoEExperts

    packed = getattr(model, "packed_modules", {})
    seam, plain = 0, []
    # A MoE block's routing gates (plain linears beside its experts) stay in full precision on
    # purpose, as lm_head does: they are not reported as left out.
    routers = {
        f"{block}.{child}"
        for block, module in model.named_modules()
        if isinstance(getattr(module, "experts", None), nn.Module)
        for child, layer in module.named_children()
        if isinstance(layer, nn.Linear)
    }
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEExperts):
            seam += 1
            moe_method = config.moe_method(module, name)
            if moe_method is not None:
                try:
                    module.set_method(moe_method)
                except ValueError as exc:
                    raise ValueError(f"layer {name}: {exc}") from None
            continue
        if name.split(".")[-1] == "lm_head":
            continue
        if isinstance(module, nn.Linear) and name not in routers:
            plain.append(name)
        if not isinstance(module, Linear):
            continue
        seam += 1
        method = config.linear_method(module, checkpoint_names(name, module, packed))
        if method is not None:
            try:
                module.set_method(method)
            except ValueError as exc:
                raise ValueError(f"layer {name}: {exc}") from None
    arch = type(model).__name__
    if not seam:
        raise ValueError(
            f"quantization {config.name!r}: {arch} builds its projections as plain torch layers "
            "(no quant method seam), so nothing would be quantized; serve it unquantized"
        )
    if plain:
        logger.warning(
            "quantization %s: %d plain torch projections of %s stay unquantized (%s%s)",
            config.name, len(plain), arch, ", ".join(plain[:3]), ", ..." if len(plain) > 3 else "",
        )  # fmt: skip
    model.quant_config = config


def matches(name: str, patterns: list[str]) -> bool:
    """Whether module `name` is named by `patterns` (exact names, a `re:` regex, or a name
    suffix on a dot, as vLLM's ignore lists are written)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def ignored_layer(format_name: str, names: list[str], patterns: list[str]) -> bool:
    """Whether a layer (its checkpoint names) is left unquantized; fused shards must agree."""
    hits = [matches(n, patterns) for n in names]
    if any(hits) and not all(hits):
        raise ValueError(
            f"{format_name} quantizes only some of {', '.join(names)}, which splitserve fuses "
            "into one layer; they must be quantized alike"
        )
    return all(hits)
