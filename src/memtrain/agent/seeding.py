"""Per-request seeds derived from one run seed, shared by the agent loop and IMR sampling."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int) -> int:
    """A reproducible 63-bit seed for one request, distinct for each tuple of ``parts``.

    The engines derive one stream per completion from a request's seed, so requests that would otherwise
    share the run seed (the trajectories of one sample, its IMR prompts) must get seeds of their own.
    """
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
