"""Model parity tests: splitserve.worker against transformers on tiny random checkpoints."""
