"""A one-shot block round of a source whose file systems are mounted: synced, or frozen, for it.

    result, quiesced = quiesced_round(sender, make_sender, quiesce)

A one-shot ``send block`` has no cutover after it: its round is the copy the operator gets.
Before the round reads its first block, every file system mounted from the source is synced
(``syncfs``: what it holds in memory, a file written a moment ago included, reaches the disk
that the round reads with O_DIRECT), or with ``--freeze`` frozen until the receiver has made
the round durable (blocks/quiesce.py). A freeze that its guard thawed at ``--freeze-timeout``
before then leaves a round that may have read blocks written after the thaw: the round runs
once more under a new freeze (a sync round: what changed since), and then the command fails
rather than end with a copy that only looks consistent. Once more only: a digest-scan round
reads the whole disk again, so a round that outlasted the timeout for its length will
again, and every attempt stalls the server's writes for up to the timeout.

A round that resumed a full copy cut short earlier (``resumed_from``) holds, below where it
resumed, what the source held back then: writes made there since were never read. A sync
round follows at once, under the same sync or freeze, so the command still ends with the
source as it is now (a migration of a running server must not end with a silently
different target); ``on_round`` gets the resumed round's result first.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from smsrepl import faults
from smsrepl.errors import TransportError

log = logging.getLogger("smsrepl.sender")
#: rounds run under a freeze before giving up (the second sends only what changed)
ATTEMPTS = 2


def quiesced_round(sender: Any, make_sender: Callable[[], Any], quiesce: Any,
                   on_round: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, str]]:
    """Run ``sender``'s round with the source's file systems quiesced (``quiesce``: a
    blocks.quiesce.Quiesce, or None for a source nothing is mounted from: an image file); the
    round's result and what was done to each file system. A resumed full round is followed by
    a sync round (``on_round`` gets the resumed one's result)."""
    attempt = 1
    while True:
        quiesced: dict[str, str] = {}
        held = True
        try:
            if quiesce is not None:
                quiesced = quiesce.begin()  # in the try: what a failed freeze did freeze is thawed
            result = sender.run()
            if result.resumed_from:
                log.info("round %d resumed a copy begun earlier at byte %d: what lies below was read then and may "
                         "have changed since; a sync round follows", result.round_id, result.resumed_from)
                if on_round is not None:
                    on_round(result)
                sender.drop_connection()
                sender = make_sender()
                result = sender.run()
            faults.point("oneshot.before_thaw")  # the target holds the source as it is quiesced
        finally:
            sender.drop_connection()
            if quiesce is not None:
                held = quiesce.end()
        if held:
            return result, quiesced
        if attempt == ATTEMPTS:
            raise TransportError(
                f"the freeze outlasted --freeze-timeout {quiesce.timeout:g} s in {ATTEMPTS} rounds in a row (the last "
                f"took {result.seconds:.1f} s): the target may hold blocks written after a thaw; give a "
                f"--freeze-timeout above the round's length, or use --continuous (with kernel tracking its cutover "
                f"round reads only what changed)")
        log.warning("the freeze outlasted --freeze-timeout %g s before the round ended: one more round under a new "
                    "freeze", quiesce.timeout)
        attempt += 1
        sender = make_sender()
