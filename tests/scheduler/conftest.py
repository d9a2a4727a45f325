"""Scheduler tests run with torch blocked: the scheduler must never import it."""

import sys

sys.modules.setdefault("torch", None)  # `import torch` now raises ImportError
