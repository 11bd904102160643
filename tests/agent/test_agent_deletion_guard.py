"""The agent's file rounds (MIGRATE_FILE, SYNC_LINUX_FILE) keep the default deletion guard: a
round that would delete more than half of the target fails with the reason, deleting nothing."""
import json
import os
import threading

from smsrepl.agent.loop import Agent
from smsrepl.lab.certs import make_bundle
from smsrepl.errors import DeletionLimitError
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context

from agent.test_agent import client, cp, states, wait_for  # noqa: F401 (cp: the fixture)


def listing(root):
    return {os.path.join(top, n): os.lstat(os.path.join(top, n)).st_mtime_ns
            for top, dirs, files in os.walk(root) for n in dirs + files} | {root: os.lstat(root).st_mtime_ns}


def test_a_file_task_against_a_target_it_would_mostly_delete_fails_and_deletes_nothing(tmp_path, cp):
    bundle = make_bundle()
    src = tmp_path / "tree"
    src.mkdir()
    (src / "only.txt").write_bytes(b"the source holds one file")  # say, a mount that did not come up
    dst = tmp_path / "target-tree"
    for d in range(3):
        (dst / f"d{d}").mkdir(parents=True)
        for f in range(10):
            (dst / f"d{d}" / f"f{f}").write_bytes(b"precious")
    before = listing(str(dst))
    rx = Receiver({"root": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    _, port = rx.start("127.0.0.1", 0)
    try:
        cp.add_task("ft", {"id": "ft", "type": "MIGRATE_FILE", "migration_ip": "127.0.0.1", "syncing": True,
                           "is_need_consistency_check": False, "target_server": {"disks": []}},
                    certkey=json.loads(bundle.to_json()),
                    configuration={"task_id": "ft", "migrate_type": "LINUX_FILE_MIGRATE", "configurations": []})
        agent = Agent(client(cp), "source-1", {}, str(tmp_path / "agent"), data_port=port, poll_interval=0.1,
                      sync_interval=3600, netcheck_seconds=0.3, tree=str(src))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        cp.push_command("source-1", "START", "ft")
        wait_for(lambda: agent.session is not None and agent.session.last_error is not None, what="the round's end")
        err = agent.session.last_error
        assert isinstance(err, DeletionLimitError)
        assert str(err).startswith("would delete 33 of 33 entries on target 'root' (more than half)")
        wait_for(lambda: states(cp) and states(cp)[-1][0] == "ERROR", what="the error state")
        assert listing(str(dst)) == before and not (dst / "only.txt").exists()
        agent.stop()
        thread.join(30)
    finally:
        rx.stop()
