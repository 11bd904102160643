"""Which block round a receiver's WELCOME calls for (transport/round_plan.py)."""
from __future__ import annotations

import pytest

from smsrepl.errors import FrameError, RemoteProtocolError
from smsrepl.protocol import frames as F
from smsrepl.transport.round_plan import RoundPlan, check_resume_offset, plan_round

MiB = 1 << 20


def welcome(state: str, round_id: int, round_kind: str = "full", checkpoint: int = 0) -> F.Welcome:
    return F.Welcome(F.PROTOCOL_VERSION, "s1", 8 * MiB, state, round_id, round_kind, checkpoint, "",
                     capabilities=list(F.CAPABILITIES))


@pytest.mark.parametrize("w,known,plan", [
    (welcome("new", 0), True, RoundPlan("full", 1, 0)),
    (welcome("new", 4), True, RoundPlan("full", 5, 0)),
    (welcome("partial", 3, "full", 2 * MiB), True, RoundPlan("full", 3, 2 * MiB, resumed=True)),
    (welcome("partial", 3, "sync", 2 * MiB), True, RoundPlan("sync", 4, 0)),
    (welcome("synced", 3, "sync"), True, RoundPlan("sync", 4, 0)),
    (welcome("synced", 3, "sync"), False, RoundPlan("full", 4, 0)),  # a dry run without state
    (welcome("partial", 3, "full", 2 * MiB), False, RoundPlan("full", 3, 2 * MiB, resumed=True)),
])
def test_the_round_a_welcome_calls_for(w, known, plan):
    assert plan_round(w, known=known) == plan


@pytest.mark.parametrize("checkpoint", [0, 4096, 8 * MiB - 4096, 8 * MiB, 8 * MiB - 100])
def test_a_resume_offset_on_a_block_boundary_or_the_end_is_taken(checkpoint):
    size = 8 * MiB - 100 if checkpoint == 8 * MiB - 100 else 8 * MiB
    check_resume_offset(welcome("partial", 1, "full", checkpoint), size)


def test_a_negative_resume_offset_never_reaches_the_plan():
    with pytest.raises(FrameError, match="Welcome.checkpoint"):  # the event refuses it when made
        welcome("partial", 1, "full", -4096)


@pytest.mark.parametrize("checkpoint", [1, 4095, 8 * MiB + 4096])
def test_a_resume_offset_off_the_blocks_of_the_source_is_refused(checkpoint):
    with pytest.raises(RemoteProtocolError) as exc:
        check_resume_offset(welcome("partial", 1, "full", checkpoint), 8 * MiB)
    assert str(exc.value).endswith(f"the receiver offers to resume at {checkpoint}, which is not a block "
                                   f"boundary of the {8 * MiB}-byte source")
    assert exc.value.code == "SMS.1908" and exc.value.exit_code == 3
