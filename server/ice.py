"""ICE settings that aiortc does not expose per peer connection.

aioice gathers host candidates from every interface except loopback, and
checks consent every 5 s, giving up after 6 failures. The server restricts
host candidates to configured addresses (tests use 127.0.0.1) and can
shorten the consent timers so a vanished peer is noticed sooner. These are
process-wide, set once at start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aioice.ice

log = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses


def restrict_host_candidates(addresses: Sequence[str]) -> None:
    """Gather host candidates only on ``addresses`` (empty: aioice's default)."""
    chosen = list(addresses)
    if not chosen:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
    log.info("ICE host candidates restricted to %s", ", ".join(chosen))


def set_consent_timers(interval_s: float, failures: int) -> None:
    """How often ICE consent is checked and after how many misses a peer is gone."""
    if interval_s <= 0 or failures < 1:
        raise ValueError(f"bad consent timers: interval {interval_s}s, failures {failures}")
    aioice.ice.CONSENT_INTERVAL = interval_s  # type: ignore[assignment]
    aioice.ice.CONSENT_FAILURES = failures
