"""FP8 e4m3 decoded from its bytes inside a Triton kernel.

Triton has no e4m3 type below CUDA capability 8.9 (Ampere has e5m2 only), so a kernel that
reads e4m3 data there (an FP8 checkpoint's weights, an FP8 KV cache) takes the tensor as uint8
(`_checks.fp8_operand`) and rebuilds each value with integer and float ops. The result is
exact: every e4m3 number is an fp32 (and an fp16 and bf16) number.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(bits):
    """float8_e4m3fn bytes (uint8) -> their fp32 values: sign, 4 exponent bits (bias 7; 0 is
    subnormal) and 3 mantissa bits. NaN (0x7F / 0xFF) is not produced: weights and caches
    hold none (a cache's quantizer saturates at 448)."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 15
    mantissa = (b & 7).to(tl.float32)
    # 2^(exponent - 10) built from its fp32 bits (exact, unlike an exp2 approximation).
    power = ((exponent + 117) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125, (mantissa + 8.0) * power)
    return tl.where((b & 128) != 0, -magnitude, magnitude)
