"""--enable-log-requests: one log line per generation request as it arrives (vLLM's
RequestLogger): its id, the prompt's text and token ids cut to --max-log-len, the sampling
parameters and the adapter. Off by default, as in current vLLM."""

from __future__ import annotations

import logging

from splitserve.gateway.config import GatewayConfig

logger = logging.getLogger("splitserve.gateway.requests")


def log_request(
    config: GatewayConfig,
    request_id: str,
    prompt_text: str | None,
    prompt_ids: list[int],
    params: object,
    lora_name: str | None,
) -> None:
    """Log one prompt of a request (a completions batch logs each as request_id-i)."""
    if not config.enable_log_requests:
        return
    limit = config.max_log_len
    if limit is not None:
        prompt_text = prompt_text[:limit] if prompt_text is not None else None
        prompt_ids = prompt_ids[:limit]
    logger.info(
        "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s, lora: %s",
        request_id,
        prompt_text,
        params,
        prompt_ids,
        lora_name,
    )
