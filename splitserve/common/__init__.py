"""Helpers more than one service (and the offline engine) share: sampling parameters, generation
and pooling config, LoRA requests, tracing, gRPC error mapping, model paths."""
