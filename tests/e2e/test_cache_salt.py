"""cache_salt through the real stack: the same prompt reuses cached KV blocks only under the
same salt (read from the scheduler's prefix-cache counters), and the tokens never change."""

from __future__ import annotations

import random
import uuid


def test_cache_salt_isolates_prefix_cache(client, server):
    stats = server.scheduler_stats()
    bs = stats.block_size
    rng = random.Random(uuid.uuid4().int)
    prompt = [rng.randrange(5, 250) for _ in range(3 * bs + 1)]  # 3 full blocks, then 1
    outputs, hits = [], []
    for salt in ["tenant-a", "tenant-b", None, "tenant-a", None]:
        before = server.scheduler_stats().prefix_cache_hits
        out = client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True, **({"cache_salt": salt} if salt else {})},
        )
        hits.append(server.scheduler_stats().prefix_cache_hits - before)
        outputs.append(out.choices[0].text)
    # First sight of each salt (and of no salt) hits nothing; each repeat reads all 3 blocks.
    assert hits == [0, 0, 0, 3 * bs, 3 * bs], hits
    assert len(set(outputs)) == 1, outputs
