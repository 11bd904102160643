"""The agent's block consistency upload (5.4.14) is consistency.for_upload's body: one entry per
disk in the reference's limits (counts 0-1,000,000, at most 30 entries), whatever the disks hold."""
from __future__ import annotations

from smsrepl.agent.block_task import BlockTask
from smsrepl.agent.fields import body_problems
from smsrepl.agent.link import TaskLink
from smsrepl.agent.loop import Agent
from smsrepl.agent.server import DiskPlan
from smsrepl.transport import sender as sender_module


class FakeSender:
    """Sender.check without a receiver: a huge disk, part of it different."""

    def __init__(self, path, target, *args, **kw) -> None:
        self.path = path

    def check(self, **kw):
        return 1_500_000, 4_000_000  # (extents that differ, extents): a 4 TiB disk


class Outbox:
    def __init__(self) -> None:
        self.items = []

    def put(self, kind, key, body) -> None:
        self.items.append((kind, key, body))


def test_block_upload_is_clamped_to_the_references_limits(monkeypatch):
    monkeypatch.setattr(sender_module, "Sender", FakeSender)
    agent = Agent.__new__(Agent)  # only what _consistency_check reads
    link = TaskLink("t1", ("127.0.0.1", 1), None, "/nonexistent", None, None, print, lambda: None)
    disks = BlockTask([DiskPlan(f"/dev/vd{i}", f"/img/{i}", f"vd{i}") for i in range(32)], link)
    agent.outbox = Outbox()
    agent._consistency_check(disks)
    [(kind, key, body)] = agent.outbox.items
    assert (kind, key) == ("consistency", "t1")
    assert list(body) == ["consistency_result"]
    entries = body["consistency_result"]
    assert len(entries) == 30 and entries[0]["dir_check"] == "/dev/vd0"
    assert entries[0] == {"dir_check": "/dev/vd0", "num_total_files": 1_000_000, "num_different_files": 1_000_000,
                          "num_target_miss_files": 0, "num_target_more_files": 0}
    assert agent.consistency == body
    assert body_problems("consistency_result", body) == []
