"""Tiny models and tokenizers built locally (tests, benchmarks and the demo `splitserve serve`
starts when no model is named); nothing here reaches a model hub."""
