"""The reference agent against the fake control plane, with a receiver on loopback started here.

Every request body the agent sends is checked by the fake control plane against the
reference's field tables; each test fails on any violation."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from smsrepl import kernels
import requests

from smsrepl.agent.client import ControlPlane
from smsrepl.lab.fakecp import FakeControlPlane
from smsrepl.agent.fields import body_problems
from smsrepl.agent.block_task import plan_disks
from smsrepl.agent.loop import Agent
from smsrepl.lab.certs import make_bundle
from smsrepl.errors import ConfigError
from smsrepl.lab.testdata import rewrite_random_blocks, write_image
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context

SLOW = bool(os.environ.get("SMSREPL_SLOW"))
TOKEN = "agent-test-token-0123456789"


@pytest.fixture(scope="module")
def bundle():
    return make_bundle()


@pytest.fixture
def cp(tmp_path):
    fake = FakeControlPlane(TOKEN, str(tmp_path / "cp"))
    url = fake.start()
    fake.url = url
    yield fake
    fake.stop()
    assert fake.violations == [], fake.violations


def client(cp):
    return ControlPlane(cp.url, TOKEN, verify=cp.ca_file, retries=1, backoff=0.1, max_backoff=0.5, timeout=(2, 5))


class Lab:
    """Two source disk images, a receiver with their targets, a task in the fake control plane."""

    def __init__(self, tmp_path, cp, bundle, *, syncing=True, check=True, sizes=(24, 12), speed=None):
        self.dir = tmp_path
        self.cp = cp
        self.src = {f"/dev/vd{c}": str(tmp_path / f"vd{c}.img") for c in "ab"[:len(sizes)]}
        self.dst = {f"vd{c}": str(tmp_path / f"t-vd{c}.img") for c in "ab"[:len(sizes)]}
        for i, (path, mib) in enumerate(zip(self.src.values(), sizes)):
            write_image(path, mib << 20, seed=i + 1)
        self.rx = Receiver(dict(self.dst), server_context(bundle), str(tmp_path / "rx"), create=True)
        _, self.port = self.rx.start("127.0.0.1", 0)
        task = {"id": "task-1", "name": "lab", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
                "migration_ip": "127.0.0.1", "syncing": syncing, "is_need_consistency_check": check,
                "target_server": {"disks": [{"name": n, "size": 1 << 30} for n in self.src]}}
        cp.add_task("task-1", task, certkey=json.loads(bundle.to_json()),
                    speed_limit=speed or {"speed_limit": []},
                    configuration={"task_id": "task-1", "configurations": [
                        {"config_key": "LINUX_CPU_LIMIT", "config_value": "90", "config_status": ""}]})

    def agent(self, **kw):
        kw.setdefault("poll_interval", 0.1)
        kw.setdefault("sync_interval", 0.5)
        kw.setdefault("speed_poll", 0.5)
        kw.setdefault("outbox_retry", 0.2)
        kw.setdefault("netcheck_seconds", 0.3)
        a = Agent(client(self.cp), "source-1", dict(self.src), str(self.dir / "agent"), data_port=self.port, **kw)
        t = threading.Thread(target=a.run, daemon=True)
        t.start()
        return a, t

    def identical(self):
        return all(filecmp.cmp(s, d, shallow=False) for s, d in zip(self.src.values(), self.dst.values()))

    def close(self):
        self.rx.stop()


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def states(cp):
    return [(b["copystate"], b["migrationcycle"]) for b in cp.bodies("changestate")]


def test_fake_control_plane_checks_every_body_against_the_field_tables(cp):
    s = requests.Session()
    url = cp.url
    cp.add_task("t1", {"id": "t1"}, certkey={})

    def put(path, body, method="PUT"):
        return s.request(method, url + path, json=body, headers={"X-Auth-Token": TOKEN}, verify=cp.ca_file)

    good = {"subtask_name": "MIGRATE_LINUX_BLOCK", "progress": 5, "replicatesize": 1, "totalsize": 2,
            "process_trace": ""}
    assert put("/v3/tasks/t1/progress", good).status_code == 200
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "progress"},
                {**good, "progress": 101}, {**good, "subtask_name": "COPY"}):
        r = put("/v3/tasks/t1/progress", bad)
        assert r.status_code == 400 and r.json()["error_code"].startswith("SMS.")
    assert put("/v3/sources/x/changestate", {"copystate": "SYNCING", "migrationcycle": "syncing"}).status_code == 200
    assert put("/v3/sources/x/changestate", {"copystate": "FINISHED", "migrationcycle": "replicating"}).status_code == 400
    assert put("/v3/sources/x/command_result", {"command_name": "START", "result": "ok", "result_detail": {}},
               "POST").status_code == 400
    assert put("/v3/tasks/t1/consistency-result", {"consistency_result": [{"dir_check": "/", "num_total_files": -1,
               "num_different_files": 0, "num_target_miss_files": 0, "num_target_more_files": 0}]},
               "POST").status_code == 400
    assert s.get(url + "/v3/tasks/t1", headers={"X-Auth-Token": "wrong"}, verify=cp.ca_file).status_code == 401
    assert len(cp.violations) == 7
    cp.violations.clear()  # expected here; the fixture fails a test on any other
    assert body_problems("network_check", {"network_delay": 1.0, "network_jitter": 0.1, "migration_speed": 100.0,
                                           "loss_percentage": 0.0, "cpu_usage": 5.0, "mem_usage": 5.0,
                                           "evaluation_result": "OPTIMAL"}) == []


def test_disks_map_by_name_then_by_position():
    task = {"target_server": {"disks": [{"name": "/dev/vda"}, {"name": "/dev/sdb", "relation_name": "/dev/vdc"}]}}
    plans = plan_disks(task, {"/dev/vda": "/a", "/dev/vdb": "/b"})
    assert [(p.name, p.target) for p in plans] == [("/dev/vda", "vda"), ("/dev/vdb", "vdc")]
    with pytest.raises(ConfigError, match="no target disk"):
        plan_disks(task, {"/dev/vda": "/a", "/dev/vdb": "/b", "/dev/vdx": "/x"})
    with pytest.raises(ConfigError, match="lists no disks"):
        plan_disks({"target_server": {"disks": []}}, {"/dev/vda": "/a"})


@pytest.mark.reliability("fault", "control plane down during a migration (agent)")
def test_two_disk_migration_continuous_sync_cutover_through_an_outage(tmp_path, cp, bundle):
    """The acceptance run: START, continuous sync, the control plane gone for a while in the
    middle (30 s with SMSREPL_SLOW), rounds keep running, the cutover round, a consistency
    result, final progress 100; every body valid."""
    lab = Lab(tmp_path, cp, bundle)
    try:
        agent, thread = lab.agent()
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: agent.copied, what="the full copy")
        outage = 30.0 if SLOW else 4.0
        rounds_before = len(agent._rounds)
        cp.outage(outage)
        t_end = time.monotonic() + outage
        changes = 0
        while time.monotonic() < t_end:  # the source keeps changing; rounds keep running
            rewrite_random_blocks(lab.src["/dev/vda"], 0.005, seed=changes)
            changes += 1
            time.sleep(0.5)
        rounds_during = len(agent._rounds) - rounds_before
        assert rounds_during >= 1, "the data transfer stopped while the control plane was down"
        assert cp.dropped > 0
        rewrite_random_blocks(lab.src["/dev/vdb"], 0.01, seed=99)  # last writes, then the source is quiesced
        agent.request_cutover()
        thread.join(120)
        assert not thread.is_alive()
        assert agent.finished and lab.identical()
        progress = cp.bodies("progress")
        assert progress[-1]["progress"] == 100
        assert progress[-1]["totalsize"] == (24 + 12) << 20
        assert states(cp)[-2:] == [("CUTOVERING", "cutovering"), ("FINISHED", "cutovered")]
        assert ("SYNCING", "syncing") in states(cp)
        [result] = cp.bodies("consistency_result")
        assert [(r["dir_check"], r["num_total_files"], r["num_different_files"])
                for r in result["consistency_result"]] == [("/dev/vda", 24, 0), ("/dev/vdb", 12, 0)]
        assert cp.bodies("command_result") == [
            {"command_name": "START", "result": "success", "result_detail": {"state": "replicating"}}]
        [check] = cp.bodies("network_check")
        assert check["destination_connectivity"] is True and check["migration_speed"] > 0
        print(f"\noutage {outage:.0f} s: {rounds_during} round(s) completed during it, {cp.dropped} requests "
              f"dropped, {len(progress)} progress reports delivered, {cp.requests} requests in all, "
              f"{len(agent._rounds)} rounds")
    finally:
        lab.close()


def test_stop_resume_speed_limit_change_and_delete(tmp_path, cp, bundle):
    """STOP pauses a copy held back by the task's speed limit; START resumes it; a faster limit
    set in the control plane reaches the running transfer; DELETE ends the task."""
    slow = {"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 20, "over_speed_threshold": 100.0}]}
    lab = Lab(tmp_path, cp, bundle, syncing=True, check=False, sizes=(24,), speed=slow)
    try:
        agent, thread = lab.agent()
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: ("REPLICATE", "replicating") in states(cp), what="replication")
        time.sleep(1.0)
        cp.push_command("source-1", "STOP")
        wait_for(lambda: ("STOPPED", "replicating") in states(cp), what="the pause")
        assert not agent.copied
        cp.set_speed_limit("task-1", {"speed_limit": [
            {"start": "00:00", "end": "23:59", "speed": 2000, "over_speed_threshold": 100.0}]})
        cp.push_command("source-1", "START")
        t0 = time.monotonic()
        wait_for(lambda: agent.copied, timeout=30, what="the resumed copy")
        assert time.monotonic() - t0 < 8  # 24 MiB at 20 Mbit/s would take ~10 s
        assert lab.identical()
        cp.push_command("source-1", "DELETE")
        thread.join(30)
        assert not thread.is_alive() and agent.deleted
        assert states(cp)[-1] == ("DELETING", "syncing")
        names = [(b["command_name"], b["result"]) for b in cp.bodies("command_result")]
        assert names == [("START", "success"), ("STOP", "success"), ("START", "success"), ("DELETE", "success")]
        assert not os.path.exists(tmp_path / "agent")
    finally:
        lab.close()


def test_a_command_without_a_task_and_a_file_task_without_a_tree_are_refused_with_a_reason(tmp_path, cp, bundle):
    lab = Lab(tmp_path, cp, bundle, sizes=(8,))
    try:
        cp.add_task("file-task", {"id": "file-task", "type": "MIGRATE_FILE", "migration_ip": "127.0.0.1",
                                  "target_server": {"disks": [{"name": "/dev/vda"}]}},
                    certkey=json.loads(bundle.to_json()))
        agent, thread = lab.agent()
        cp.push_command("source-1", "SYNC")
        cp.push_command("source-1", "START", "file-task")
        wait_for(lambda: len(cp.bodies("command_result")) == 2, what="two answers")
        sync, start = cp.bodies("command_result")
        assert sync["result"] == "fail" and "no task" in sync["result_detail"]["error_msg"]
        assert start["result"] == "fail" and "--tree" in start["result_detail"]["error_msg"]
        agent.stop()
        thread.join(10)
    finally:
        lab.close()


@pytest.mark.reliability("fault", "agent killed mid-copy, restarted")
def test_agent_process_killed_mid_copy_carries_on_after_a_restart(tmp_path, cp, bundle):
    """`smsrepl agent` killed (SIGKILL) during the copy: restarted, it resumes the task without
    a new START, finishes the copy, runs the cutover round on SIGTERM and exits 0."""
    slow = {"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 16, "over_speed_threshold": 100.0}]}
    lab = Lab(tmp_path, cp, bundle, sizes=(24,), speed=slow)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    args = [sys.executable, "-m", "smsrepl", "agent", "--endpoint", cp.url, "--token-file", str(token),
            "--source-id", "source-1", "--disk", f"/dev/vda={lab.src['/dev/vda']}", "--ca-file", cp.ca_file,
            "--data-port", str(lab.port), "--state-dir", str(tmp_path / "agent"), "--poll-interval", "0.2",
            "--sync-interval", "1"]
    procs = []
    try:
        procs.append(subprocess.Popen(args, stderr=subprocess.DEVNULL))
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: ("REPLICATE", "replicating") in states(cp), what="replication")
        time.sleep(2.0)
        procs[0].kill()
        procs[0].wait(10)
        assert not lab.identical()
        cp.set_speed_limit("task-1", {"speed_limit": []})
        procs.append(subprocess.Popen(args, stderr=subprocess.DEVNULL))
        wait_for(lambda: ("SYNCING", "syncing") in states(cp), timeout=90, what="the resumed copy")
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(90) == 0
        assert lab.identical()
        assert cp.bodies("progress")[-1]["progress"] == 100
        [result] = cp.bodies("consistency_result")
        assert result["consistency_result"][0]["num_different_files"] == 0
        assert [b["command_name"] for b in cp.bodies("command_result")] == ["START"]  # no second START needed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        lab.close()


def test_skip_means_no_consistency_check(tmp_path, cp, bundle):
    lab = Lab(tmp_path, cp, bundle, sizes=(8,))
    try:
        agent, thread = lab.agent()
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: agent.copied, what="the copy")
        cp.push_command("source-1", "SKIP")
        wait_for(lambda: len(cp.bodies("command_result")) == 2, what="SKIP's answer")
        agent.request_cutover()
        thread.join(60)
        assert agent.finished and lab.identical()
        assert cp.bodies("command_result")[1] == {"command_name": "SKIP", "result": "success",
                                                  "result_detail": {"skip_consistency_check": True}}
        assert cp.bodies("consistency_result") == []
        assert states(cp)[-1] == ("FINISHED", "cutovered")
    finally:
        lab.close()


def test_file_level_task_copy_sync_cutover_and_consistency(tmp_path, cp, bundle):
    """A MIGRATE_FILE task: the tree goes to the receiver's directory target with the task's
    path rules, SYNC sends a change, the cutover round and a per-directory consistency result."""
    src = tmp_path / "tree"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(10):
            (src / f"d{d}" / f"f{f}.txt").write_bytes(b"x%d-%d " % (d, f) * (100 + f))
    (src / "skip").mkdir()
    (src / "skip" / "secret").write_bytes(b"not to be copied")
    dst = tmp_path / "target-tree"
    rx = Receiver({"root": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    _, port = rx.start("127.0.0.1", 0)
    try:
        cp.add_task("ft", {"id": "ft", "type": "MIGRATE_FILE", "migration_ip": "127.0.0.1", "syncing": True,
                           "is_need_consistency_check": True, "target_server": {"disks": []}},
                    certkey=json.loads(bundle.to_json()),
                    configuration={"task_id": "ft", "migrate_type": "LINUX_FILE_MIGRATE", "configurations": [
                        {"config_key": "MIGRATE_EXCLUDE_PATH", "config_value": "/skip", "config_status": ""},
                        {"config_key": "CONSISTENCY_DIR", "config_value": "/d0,/d1", "config_status": ""}]})
        agent = Agent(client(cp), "source-1", {}, str(tmp_path / "agent"), data_port=port, poll_interval=0.1,
                      sync_interval=3600, netcheck_seconds=0.3, tree=str(src))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        cp.push_command("source-1", "START", "ft")
        wait_for(lambda: agent.copied, what="the tree copy")
        assert (dst / "d2" / "f9.txt").read_bytes() == (src / "d2" / "f9.txt").read_bytes()
        assert not (dst / "skip" / "secret").exists()
        (src / "d1" / "f3.txt").write_bytes(b"changed on the source")
        n = len(agent._rounds)
        cp.push_command("source-1", "SYNC")
        wait_for(lambda: len(agent._rounds) > n, what="the sync round")
        assert agent._rounds[-1].kind == "sync" and agent._rounds[-1].files_sent == 1
        assert (dst / "d1" / "f3.txt").read_bytes() == b"changed on the source"
        if os.geteuid() == 0 and kernels.TREE:  # SYNC_LINUX_FILE rounds follow the tree's change journal
            assert agent._driver.journal is not None and agent._rounds[-1].scope == "journal"
        agent.request_cutover()
        thread.join(60)
        assert agent.finished
        [result] = cp.bodies("consistency_result")
        assert [(r["dir_check"], r["num_total_files"], r["num_different_files"], r["num_target_miss_files"])
                for r in result["consistency_result"]] == [("/d0", 10, 0, 0), ("/d1", 10, 0, 0)]
        subtasks = {b["subtask_name"] for b in cp.bodies("progress")}
        assert subtasks == {"MIGRATE_LINUX_FILE", "SYNC_LINUX_FILE"}
        assert states(cp)[-1] == ("FINISHED", "cutovered")
    finally:
        rx.stop()


@pytest.mark.parametrize("extra,message", [
    (["--disk", "/dev/vda"], "expected NAME=PATH"),
    (["--disk", "/dev/vda={token}", "--disk", "/dev/vda={token}"], "given twice"),
    ([], "--disk NAME=PATH (block tasks) or --tree DIR"),
])
def test_agent_command_line_mistakes_are_usage_errors(tmp_path, extra, message):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "agent", "--endpoint", "https://127.0.0.1:9",
                         "--token-file", str(token), "--source-id", "s", "--state-dir", str(tmp_path / "st"),
                         *(arg.format(token=token) for arg in extra)],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and message in cp.stderr, cp.stderr
    missing = subprocess.run([sys.executable, "-m", "smsrepl", "agent", "--endpoint", "https://127.0.0.1:9",
                              "--token-file", str(tmp_path / "nope"), "--source-id", "s"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--token-file" in missing.stderr and TOKEN not in missing.stderr


def test_malformed_command_and_speed_limit_from_the_control_plane_are_ignored(tmp_path, cp, bundle):
    lab = Lab(tmp_path, cp, bundle, sizes=(8,), syncing=False, check=False)
    try:
        agent, thread = lab.agent()
        cp.push_command("source-1", "REBOOT")  # not a 5.5.1 command: logged, no answer, nothing done
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: agent.finished, what="the copy")
        cp.set_speed_limit("task-1", {"speed_limit": [{"start": "25:00", "end": "23:59", "speed": 1}]})
        agent._refresh_speed_limit()
        assert agent._schedule_raw == {"speed_limit": []}  # the valid schedule stays
        thread.join(30)
        assert [b["command_name"] for b in cp.bodies("command_result")] == ["START"]
        assert lab.identical()
    finally:
        lab.close()


def test_the_outbox_keeps_each_subtasks_last_progress_while_the_control_plane_lags():
    """Waiting progress reports are replaced by newer ones of the same subtask only: the copy's
    last report (100%) still reaches the control plane when the sync round's first one follows
    before it was delivered (seen on a busy machine: the control plane never heard of the copy)."""
    from smsrepl.agent.outbox import Outbox

    gate, got = threading.Event(), []

    class SlowControlPlane:
        def put_state(self, ident, body):
            gate.wait(10)

        def put_progress(self, ident, body):
            got.append((body["subtask_name"], body["progress"]))

        post_command_result = post_consistency_result = post_network_check = put_state

    box = Outbox(SlowControlPlane())
    try:
        box.put("state", "t", {"copystate": "REPLICATE"})  # in flight, held by the gate
        for subtask, progress in (("MIGRATE_LINUX_FILE", 10), ("MIGRATE_LINUX_FILE", 100), ("SYNC_LINUX_FILE", 5),
                                  ("SYNC_LINUX_FILE", 60)):
            box.put("progress", "t", {"subtask_name": subtask, "progress": progress})
        gate.set()
        assert box.flush(10)
    finally:
        box.close()
    assert got == [("MIGRATE_LINUX_FILE", 100), ("SYNC_LINUX_FILE", 60)]


def test_sync_during_a_running_round_queues_exactly_one_more_round(tmp_path, cp, bundle):
    """SYNC while a round runs is not refused: it is acknowledged (success, queued) and one more
    round runs after the running one; several SYNCs during that round make one round, not three."""
    slow = {"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40, "over_speed_threshold": 100.0}]}
    lab = Lab(tmp_path, cp, bundle, syncing=True, check=False, sizes=(24,), speed=slow)
    try:
        agent, thread = lab.agent(sync_interval=3600)  # no round of its own accord: only the SYNCs'
        cp.push_command("source-1", "START", "task-1")
        wait_for(lambda: ("REPLICATE", "replicating") in states(cp), what="replication")
        for _ in range(3):
            cp.push_command("source-1", "SYNC")
        wait_for(lambda: len(cp.bodies("command_result")) == 4, what="four answers")
        assert not agent.copied, "the copy ended before the SYNCs arrived: make it slower"
        start, *syncs = cp.bodies("command_result")
        assert start["result"] == "success"
        assert [(b["command_name"], b["result"], b["result_detail"]["queued"], b["result_detail"]["coalesced"])
                for b in syncs] == [("SYNC", "success", True, False), ("SYNC", "success", True, True),
                                    ("SYNC", "success", True, True)]
        wait_for(lambda: len(agent._rounds) == 2 and not agent.session.running, timeout=90,
                 what="the copy and one sync round")
        time.sleep(1.5)  # poll_interval is 0.1 s: a second queued round would have started by now
        assert [r.kind for r in agent._rounds] == ["full", "sync"]
        assert not agent.session.running and lab.identical()
        assert ("SYNCING", "syncing") in states(cp)
        cp.push_command("source-1", "SYNC")  # with no round running: a round at once, as before
        wait_for(lambda: len(agent._rounds) == 3, what="the third round")
        assert "queued" not in cp.bodies("command_result")[-1]["result_detail"]
        agent.stop()
        thread.join(30)
    finally:
        lab.close()


def test_an_agent_with_streams_runs_its_sessions_over_that_many_connections(tmp_path, cp, bundle, caplog):
    lab = Lab(tmp_path, cp, bundle, sizes=(16,))
    try:
        with caplog.at_level("INFO", logger="smsrepl.sender"):
            agent, thread = lab.agent(streams=3)
            cp.push_command("source-1", "START", "task-1")
            wait_for(lambda: agent.copied, what="the copy")
            agent.request_cutover()
            thread.join(60)
        assert agent.finished and lab.identical()
        assert "runs over 3 connections" in caplog.text
    finally:
        lab.close()
