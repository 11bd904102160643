"""The cutover round of a continuous sync (replication.continuous) is a round that began after
the cutover was requested: one that resumed a copy begun before does not end the sync."""
from __future__ import annotations

from smsrepl.replication.continuous import ContinuousSync
from smsrepl.transport.sender import RoundResult


class _Quiesce:
    def __init__(self, events: list) -> None:
        self.events = events

    def begin(self) -> dict:
        self.events.append("quiesce")
        return {"/": "synced"}

    def end(self) -> bool:
        self.events.append("thaw")
        return True


class _Sender:
    def __init__(self, result: RoundResult, events: list) -> None:
        self.result, self.events = result, events

    def run(self) -> RoundResult:
        self.events.append(f"{self.result.kind} from {self.result.resumed_from}")
        return self.result

    def stop(self) -> None:
        pass


def _result(kind: str, resumed_from: int) -> RoundResult:
    return RoundResult(1, kind, resumed_from, 24 << 20, 1 << 20, 1 << 20, 0.1)


def test_a_cutover_round_that_resumed_an_earlier_copy_is_followed_by_one_more():
    events: list = []
    rounds = iter([_result("full", 8 << 20), _result("sync", 0)])
    sync = ContinuousSync(lambda: _Sender(next(rounds), events), interval=0, quiesce=_Quiesce(events))
    sync.request_cutover()  # while the copy waited to resume (a receiver restarting)
    done = sync.run()
    assert events == ["quiesce", "full from 8388608", "sync from 0", "thaw"]
    assert [r.kind for r in done] == ["full", "sync"]


def test_a_cutover_round_from_the_start_is_the_last():
    events: list = []
    rounds = iter([_result("sync", 0)])
    sync = ContinuousSync(lambda: _Sender(next(rounds), events), interval=0, quiesce=_Quiesce(events))
    sync.request_cutover()
    sync.run()
    assert events == ["quiesce", "sync from 0", "thaw"]


def test_the_agents_cutover_round_runs_a_disk_again_when_it_resumed_an_earlier_copy(tmp_path):
    """The agent's server round (agent.server.ServerRound) at the cutover: a disk whose copy
    resumed one begun before the cutover is copied again, the source still quiesced."""
    from smsrepl.agent.server import DiskPlan, ServerRound

    disks = []
    for name in ("vda", "vdb"):
        path = tmp_path / f"{name}.img"
        path.write_bytes(b"\1" * (1 << 20))
        disks.append(DiskPlan(f"/dev/{name}", str(path), name))
    events: list = []
    rounds = iter([_result("full", 8 << 20), _result("sync", 0), _result("sync", 0)])
    rnd = ServerRound(disks, lambda disk, on_report: _Sender(next(rounds), events), str(tmp_path / "state"),
                      cutover=True, quiesce=_Quiesce(events))
    out = rnd.run()
    assert events == ["quiesce", "full from 8388608", "sync from 0", "sync from 0", "thaw"]
    assert [r.kind for r in out.disks] == ["sync", "sync"]
