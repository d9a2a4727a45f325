"""Linear layers and the seam that decides how their weights are held and applied.

Every projection of the decoder models is a `Linear` that hands three jobs to its
`LinearMethod`: `create_weights` registers the parameters (names mirror the checkpoint, so the
loader fills them by name), `process_weights_after_loading` may re-arrange them once every
weight is in place, and `apply` runs the projection. `UnquantizedLinearMethod` is the only one
today: a plain weight, packed for oneDNN on CPU float32 (`cpu_linear`). Quantized formats add
their own methods on the same seam.

Fused projections (q/k/v, gate/up) know where each checkpoint shard lives along their output
dimension, so the loader copies `q_proj.weight` into the right rows of `qkv_proj.weight`.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.worker import cpu_linear


class LinearMethod:
    """How a `Linear` holds its weights and computes `x @ W.T + b`."""

    def create_weights(
        self, layer: Linear, in_features: int, out_features: int, bias: bool
    ) -> None:
        """Register the layer's parameters (shapes in the checkpoint's terms)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Called once after every weight of the model is loaded; may replace parameters."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The projection of x [..., in_features] -> [..., out_features]."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [out, in] in the model's dtype. On CPU float32, projections of several
    rows run through oneDNN, on the plain weight or on its packed form, which then replaces
    the plain one (`cpu_linear`); either way the model holds one copy."""

    def create_weights(
        self, layer: Linear, in_features: int, out_features: int, bias: bool
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        layer.onednn = False

    def process_weights_after_loading(self, layer: Linear) -> None:
        mode = cpu_linear.mode()
        if mode == "0" or not cpu_linear.supports(layer.weight, layer.bias):
            return
        layer.onednn = True
        # NOTE: a weight another module also holds (a tied lm_head) stays plain: packing it
        # would take it from the embedding, or keep a second copy.
        if mode == "packed" and not layer.keep_plain_weight:
            layer.weight = nn.Parameter(cpu_linear.pack(layer.weight), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.onednn and (x.numel() != x.shape[-1] or cpu_linear.is_packed(layer.weight)):
            return cpu_linear.onednn_linear(x, layer.weight, layer.bias)
        return torch.nn.functional.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x @ W.T + b, with the weight's form and the computation left to `method`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.method = method if method is not None else UnquantizedLinearMethod()
        self.keep_plain_weight = False
        """Set before `process_weights_after_loading` when something else needs the plain
        weight (the loader sets it for weights shared with another module)."""
        self.method.create_weights(self, in_features, out_features, bias)
        self.register_state_dict_post_hook(_plain_state)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={type(self.method).__name__}"
        )


def _plain_state(module: Linear, state: dict, prefix: str, local_metadata: dict) -> None:
    # NOTE: a state dict holds checkpoint-form tensors whatever layout serving uses, so
    # comparing or saving a loaded model keeps working (the dense copies are the caller's).
    key = prefix + "weight"
    if key in state:
        state[key] = cpu_linear.unpack(state[key])


def process_weights_after_loading(model: nn.Module) -> int:
    """Run every `Linear`'s post-load step; returns how many now run through oneDNN.

    A parameter reachable from two modules (lm_head tied to the embedding) is marked
    `keep_plain_weight` first.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if owners.get(id(module.weight), 0) > 1:
            module.keep_plain_weight = True
        module.process_weights_after_loading()
        count += bool(getattr(module, "onednn", False))
    return count


class MergedLinear(Linear):
    """A Linear whose output rows stack several checkpoint projections, in declaration order."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = offset
            offset += size

    def load_shard(self, param_name: str, shard_id: str, loaded: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`weight` or `bias` of shard `shard_id`) into place."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(
                f"checkpoint has a {param_name} for shard {shard_id!r} but the "
                f"module was built without one"
            )
        start, size = self.shard_offsets[shard_id], self.shard_sizes[shard_id]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard_id!r} {param_name} has shape {tuple(loaded.shape)}, "
                f"expected ({size}, {', '.join(map(str, param.shape[1:]))})"
            )
        with torch.no_grad():
            param.data[start : start + size].copy_(loaded)


class QKVLinear(MergedLinear):
    """q, k and v projections in one: output is [Hq * D | Hk * D | Hk * D]."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
    ) -> None:
        super().__init__(
            hidden_size,
            {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias,
        )


class GateUpLinear(MergedLinear):
    """gate and up projections in one: output is [gate | up]."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias)
