"""splitserve.worker: one pipeline rank — model slice, paged KV cache, step execution.

Modules:
    config          WorkerConfig (the CLI flags are generated from it)
    model_loader    config + weights of this rank's slice (safetensors / pt / dummy)
    models/         Llama, Mistral, Qwen2 (HF parameter names, fused qkv / gate_up)
    layers, linear  RMSNorm, SiLU-and-mul, rotary (via splitserve.kernels.dispatch; the cos/sin
                    table from splitserve.kernels.rotary); fused projections
    attention       per-step AttentionMetadata, the Attention layer, torch / triton backends
    cuda_graphs     capture sizes and decode-step CUDA graphs (padded batches, eager fallback)
    kv_cache        KV tensors [num_blocks, block_size, num_kv_heads, head_dim] per layer
    input_batch     per-request state across steps, as rows of preallocated arrays
    sampler         logits -> tokens (vLLM semantics), logprobs
    model_runner    ModelRunner: describe / initialize_cache / execute(StepRequest)
    server          the gRPC WorkerService and `run_worker`
"""
