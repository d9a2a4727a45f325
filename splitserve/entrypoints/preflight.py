"""Checks `splitserve serve` runs before it starts any process or opens any port.

Everything a worker or the tokenizer service would refuse at load time is refused here first,
with the same message: a missing folder or file, config code that needs --trust-remote-code, an
unsupported architecture, a checkpoint tensor whose shape does not match the config, a
--max-model-len beyond the model's, a tokenizer that cannot load in the chosen mode. The worker
checks read only the checkpoint headers (no weights); a hub id is resolved (downloaded when
allowed) here once, so the processes started next find it in the cache.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)


def preflight(worker_config, tokenizer_config) -> None:
    """Raise ValueError / FileNotFoundError naming the problem if the model cannot be served."""
    from splitserve.tokenizer_svc.tokenizer import load_tokenizer
    from splitserve.worker.model_loader import check_model

    for rank in range(worker_config.pipeline_parallel_size):
        path = check_model(dataclasses.replace(worker_config, rank=rank))
    logger.info("model %s checked: %s", worker_config.model, path)
    import json

    from splitserve.common.pooling import check_runner, resolve_pooler

    architectures = json.loads((path / "config.json").read_text()).get("architectures")
    if check_runner(worker_config, architectures) == "pooling":
        # A sentence-transformers pooling mode splitserve lacks fails here, not in a worker.
        resolve_pooler(path, worker_config.pooler_config, worker_config.override_pooler_config)
    try:
        load_tokenizer(tokenizer_config)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # transformers raises OSError, KeyError, ... for a bad folder
        raise ValueError(
            f"tokenizer {tokenizer_config.tokenizer!r} cannot be loaded "
            f"(--tokenizer-mode {tokenizer_config.tokenizer_mode}): {type(exc).__name__}: {exc}"
        ) from exc
