"""splitserve.tokenizer_svc."""
