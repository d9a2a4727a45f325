"""Linear layers and the seam that decides how their weights are held and applied.

Every projection of the decoder models is a `Linear` that hands three jobs to its
`LinearMethod`: `create_weights` registers the parameters (names mirror the checkpoint, so the
loader fills them by name), `process_weights_after_loading` may re-arrange them once every
weight is in place, and `apply` runs the projection. `UnquantizedLinearMethod` is the only one
today: a plain weight, packed for oneDNN on CPU float32 (`cpu_linear`). Quantized formats add
their own methods on the same seam.

Every parameter carries its own `weight_loader(param, tensor, shard_id=None)`, set by whoever
creates it (`set_weight_attrs`); the model loader only maps a checkpoint name to (parameter,
shard id) and calls it. Fused projections (q/k/v, gate/up) know where each checkpoint shard lives
along their output dimension, so their loader copies `q_proj.weight` (or `q_proj.weight_scale`,
whatever the quant method registered) into the right rows of `qkv_proj.weight`. A parameter's
`row_block` (default 1) says how many output rows one of its rows covers (a block-wise scale
has one row per block of outputs); `output_dim` (default 0) names the axis that runs over the
outputs (1 for int4 layouts stored [in, out / 8], whose `row_block` 8 is the pack factor);
`per_shard` marks a tensor with one entry per checkpoint shard (a per-tensor scale).

Under tensor parallelism the same attributes say how a rank's slice is cut: a fused column
projection narrows each checkpoint tensor along `output_dim`, in units of `row_block` rows (a
block scale by whole blocks of outputs); a row-parallel layer (`parallel_layers`) narrows a
tensor along its `input_dim` (1 for a dense or FP8 weight [out, in], 0 for AWQ's [in, out / 8];
unset: the tensor does not run over the inputs, and every rank reads it whole, as a per-channel
or per-tensor scale), in units of `col_block` columns (a block scale's block width, 8 for int4
packed along the inputs, the group size for int4 scales and zero points). A per-shard tensor
is read whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitserve.worker import cpu_linear, parallel_state
from splitserve.worker.checkpoint_slices import reads_slices, whole

WeightLoader = Callable[..., None]
"""weight_loader(param, loaded, shard_id=None): copy one checkpoint tensor into `param`."""


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a whole tensor of the same shape (cast to the parameter's dtype)."""
    if shard_id is not None:
        raise ValueError(f"is one shard ({shard_id!r}) of a parameter that has no shards")
    if param.numel() == loaded.numel() == 1:
        loaded = loaded.reshape(param.shape)  # a scalar scale saved as [] or [1]
    if param.shape != loaded.shape:
        raise ValueError(f"has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


def set_weight_attrs(module: nn.Module, name: str, **attrs: Any) -> None:
    """Attach loading attributes (weight_loader, row_block, per_shard, shard_ids) to parameter
    `name` of `module`, and remember them so `restore_weight_attrs` puts them back on the new
    parameter objects that `to_empty` makes."""
    saved = module.__dict__.setdefault("_weight_attrs", {})
    saved.setdefault(name, {}).update(attrs)
    param = getattr(module, name)
    for key, value in attrs.items():
        setattr(param, key, value)


def restore_weight_attrs(model: nn.Module) -> None:
    """Re-attach every `set_weight_attrs` attribute (after `to_empty` from the meta device)."""
    for module in model.modules():
        for name, attrs in module.__dict__.get("_weight_attrs", {}).items():
            param = getattr(module, name, None)
            if param is not None:
                for key, value in attrs.items():
                    setattr(param, key, value)


class LinearMethod:
    """How a `Linear` holds its weights and computes `x @ W.T + b`."""

    supports_tensor_parallel: bool = False
    """Whether its weight loader can take one tensor-parallel rank's slice of a tensor."""

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

    supports_tensor_parallel = True

    def create_weights(
        self, layer: Linear, in_features: int, out_features: int, bias: bool
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.register_weight("weight", input_dim=1)
        layer.create_bias(bias)
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
        self.has_bias = bias
        self.tp_sharded = getattr(self, "tp_sharded", False)
        """Whether this rank holds a tensor-parallel slice (set by parallel subclasses)."""
        self.keep_plain_weight = False
        """Set before `process_weights_after_loading` when something else needs the plain
        weight (the loader sets it for weights shared with another module)."""
        self.method.create_weights(self, in_features, out_features, bias)
        self.register_state_dict_post_hook(_plain_state)

    def register_weight(self, name: str, **attrs: Any) -> None:
        """Give parameter `name` this layer's weight loader (plus `attrs`: row_block, ...)."""
        set_weight_attrs(self, name, weight_loader=self.weight_loader, **attrs)

    def create_bias(self, bias: bool) -> None:
        """The bias [out_features] in the compute dtype (every method's, quantized or not)."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False)
            self.register_weight("bias")
        else:
            self.register_parameter("bias", None)

    def set_method(self, method: LinearMethod) -> None:
        """Swap the quant method before loading: drop the parameters and create the new ones."""
        check_sliceable(method, self.tp_sharded)
        for name in list(self._parameters):
            delattr(self, name)
        self.__dict__.pop("_weight_attrs", None)
        self.method = method
        self.method.create_weights(self, self.in_features, self.out_features, self.has_bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy one checkpoint tensor into `param` (a plain layer has no shards)."""
        default_weight_loader(param, loaded, shard_id)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={type(self.method).__name__}"
        )


def check_sliceable(method, tp_sharded: bool) -> None:
    """ValueError when a tensor-parallel layer is given a quant method that cannot slice; the
    method's `tensor_parallel_refusal` (if it has one) says why."""
    if tp_sharded and not getattr(method, "supports_tensor_parallel", False):
        why = getattr(method, "tensor_parallel_refusal", None) or (
            "its layout is not sliced over tensor-parallel ranks"
        )
        raise ValueError(
            f"the quantization method {type(method).__name__} cannot load one rank's slice of "
            f"a layer ({why}): serve this checkpoint with --tensor-parallel-size 1 (split the "
            "model with --pipeline-parallel-size instead)"
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
            if hasattr(module, "process_weights_after_loading"):  # MoE experts
                module.process_weights_after_loading()
            continue
        weight = getattr(module, "weight", None)  # int4 layers hold qweight, not weight
        if weight is not None and owners.get(id(weight), 0) > 1:
            module.keep_plain_weight = True
        module.process_weights_after_loading()
        count += bool(getattr(module, "onednn", False))
    return count


class MergedLinear(Linear):
    """A Linear whose output rows stack several checkpoint projections, in declaration order.

    Under tensor parallelism each shard holds only this rank's rows of its checkpoint tensor:
    `shard_sources` gives, per shard, the first checkpoint row it takes (0 for all by default),
    and the loader narrows each checkpoint tensor to those rows before copying.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool,
        shard_sources: dict[str, int] | None = None,
    ) -> None:
        self.shard_sources = dict(shard_sources or {})
        self.tp_sharded = bool(self.shard_sources)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = offset
            offset += size
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)

    def register_weight(self, name: str, **attrs: Any) -> None:
        super().register_weight(name, shard_ids=list(self.shard_sizes), **attrs)

    @reads_slices
    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy checkpoint tensor `loaded` of shard `shard_id` into its rows of `param` (the
        whole fused tensor when shard_id is None)."""
        if shard_id is None:
            if self.shard_sources:
                raise ValueError(
                    "is a whole fused tensor, which tensor parallelism cannot slice; save the "
                    "checkpoint with separate projections"
                )
            default_weight_loader(param, loaded)
            return
        name = self._param_name(param)
        if getattr(param, "per_shard", False):
            target = param.data[list(self.shard_sizes).index(shard_id)]
            loaded = whole(loaded)
            loaded = loaded.reshape(()) if loaded.numel() == 1 else loaded
        else:
            if self.shard_sources:
                loaded = self._rank_rows(param, name, loaded, shard_id)
            start, size = self.shard_offsets[shard_id], self.shard_sizes[shard_id]
            block = getattr(param, "row_block", 1)
            if start % block:
                raise ValueError(
                    f"shard {shard_id!r} starts at output row {start}, not a multiple of the "
                    f"{name} block size {block}"
                )
            start, size = start // block, -(-size // block)
            target = param.data.narrow(getattr(param, "output_dim", 0), start, size)
        if loaded.shape != target.shape:
            raise ValueError(
                f"shard {shard_id!r} {name} has shape {tuple(loaded.shape)}, "
                f"expected ({', '.join(map(str, target.shape))})"
            )
        with torch.no_grad():
            target.copy_(loaded)

    def _rank_rows(self, param: torch.Tensor, name: str, loaded, shard_id: str) -> torch.Tensor:
        """This rank's rows of checkpoint tensor `loaded` of shard `shard_id`: along the
        parameter's `output_dim`, a whole number of its `row_block`-row blocks."""
        source, size = self.shard_sources[shard_id], self.shard_sizes[shard_id]
        block = getattr(param, "row_block", 1)
        if source % block or size % block:
            raise ValueError(
                f"tensor parallelism gives this rank output rows [{source}, {source + size}) of "
                f"shard {shard_id!r}, not a whole number of the {name} blocks of {block} rows; "
                "use a --tensor-parallel-size that splits every shard into whole blocks"
            )
        return loaded.narrow(getattr(param, "output_dim", 0), source // block, size // block)

    def _param_name(self, param: torch.Tensor) -> str:
        for name, p in self.named_parameters(recurse=False):
            if p is param:
                return name
        return "tensor"


class QKVLinear(MergedLinear):
    """q, k and v projections in one: output is [Hq * D | Hk * D | Hk * D], over this
    tensor-parallel rank's heads (`parallel_state.current()`; `local_heads`)."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
    ) -> None:
        state = parallel_state.current()
        (q0, hq), (k0, hk) = local_heads(num_heads, num_kv_heads, state.tp_rank, state.tp_size)
        sources = None
        if state.tp_size > 1:
            sources = {"q": q0 * head_dim, "k": k0 * head_dim, "v": k0 * head_dim}
        super().__init__(
            hidden_size, {"q": hq * head_dim, "k": hk * head_dim, "v": hk * head_dim}, bias, sources
        )


def local_heads(
    num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first q head, q heads), (first kv head, kv heads)) of tensor-parallel rank `tp_rank`:
    query heads split evenly; KV heads split too, or, with fewer KV heads than ranks, each
    rank holds the one KV head its query heads read (replicated over tp_size / Hk ranks)."""
    hq = parallel_state.shard_size(num_heads, tp_size, "num_attention_heads")
    if num_kv_heads >= tp_size:
        hk = parallel_state.shard_size(num_kv_heads, tp_size, "num_key_value_heads")
        return (tp_rank * hq, hq), (tp_rank * hk, hk)
    if tp_size % num_kv_heads:
        raise ValueError(
            f"--tensor-parallel-size {tp_size} is not a multiple of num_key_value_heads "
            f"({num_kv_heads}), so KV heads cannot be replicated evenly"
        )
    return (tp_rank * hq, hq), (tp_rank * num_kv_heads // tp_size, 1)


class GateUpLinear(MergedLinear):
    """gate and up projections in one: output is [gate | up], over this tensor-parallel rank's
    intermediate features."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        state = parallel_state.current()
        size = parallel_state.shard_size(intermediate_size, state.tp_size, "intermediate_size")
        sources = None
        if state.tp_size > 1:
            sources = {"gate": state.tp_rank * size, "up": state.tp_rank * size}
        super().__init__(hidden_size, {"gate": size, "up": size}, bias, sources)
