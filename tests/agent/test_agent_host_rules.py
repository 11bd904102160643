"""The agent's file task with the host paths a control plane sends (issue 24): a rule naming a
path under the agent's --tree is that path; a rule matching nothing is logged; a rule that would
exclude the whole tree refuses the task."""
import json
import logging
import threading

from smsrepl.agent.loop import Agent
from smsrepl.lab.certs import make_bundle
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context

from agent.test_agent import client, cp, wait_for  # noqa: F401 (cp: the fixture)


def task(cp, bundle, src, *rules):
    cp.add_task("ft", {"id": "ft", "type": "MIGRATE_FILE", "migration_ip": "127.0.0.1", "syncing": False,
                       "is_need_consistency_check": False, "target_server": {"disks": []}},
                certkey=json.loads(bundle.to_json()),
                configuration={"task_id": "ft", "migrate_type": "LINUX_FILE_MIGRATE", "configurations": [
                    {"config_key": k, "config_value": v, "config_status": ""} for k, v in rules]})


def test_a_file_task_excludes_a_host_path_under_its_tree_and_logs_a_rule_that_matched_nothing(tmp_path, cp, caplog):
    bundle = make_bundle()
    src = tmp_path / "srv"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "junk").write_bytes(b"not to be copied")
    (src / "data.txt").write_bytes(b"copied")
    dst = tmp_path / "target-tree"
    rx = Receiver({"root": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    _, port = rx.start("127.0.0.1", 0)
    try:
        task(cp, bundle, src, ("EXCLUDE_MIGRATE_PATH", f"{src}/cache,{src}/cach"))
        agent = Agent(client(cp), "source-1", {}, str(tmp_path / "agent"), data_port=port, poll_interval=0.1,
                      netcheck_seconds=0, tree=str(src))
        thread = threading.Thread(target=agent.run, daemon=True)
        with caplog.at_level(logging.WARNING, logger="smsrepl.agent"):
            thread.start()
            cp.push_command("source-1", "START", "ft")
            wait_for(lambda: agent.finished, what="the file task")
            agent.stop()
            thread.join(30)
        assert (dst / "data.txt").read_bytes() == b"copied" and not (dst / "cache").exists()
        notes = [r.getMessage() for r in caplog.records if "matched nothing" in r.getMessage()]
        assert notes == [f"EXCLUDE_MIGRATE_PATH '{src}/cach' matched nothing under {src}"]
    finally:
        rx.stop()


def test_a_file_task_whose_exclude_names_its_tree_is_refused_with_the_rule(tmp_path, cp):
    bundle = make_bundle()
    src = tmp_path / "srv"
    src.mkdir()
    (src / "data.txt").write_bytes(b"x")
    dst = tmp_path / "target-tree"
    rx = Receiver({"root": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    _, port = rx.start("127.0.0.1", 0)
    try:
        task(cp, bundle, src, ("SYNC_EXCLUDE_DIR", f"{src}"))
        agent = Agent(client(cp), "source-1", {}, str(tmp_path / "agent"), data_port=port, poll_interval=0.1,
                      netcheck_seconds=0, tree=str(src))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        cp.push_command("source-1", "START", "ft")
        wait_for(lambda: len(cp.bodies("command_result")) == 1, what="the answer to START")
        [start] = cp.bodies("command_result")
        msg = start["result_detail"]["error_msg"]
        assert start["result"] == "fail" and "SYNC_EXCLUDE_DIR" in msg and repr(str(src)) in msg, msg
        agent.stop()
        thread.join(10)
        assert not dst.exists()  # nothing sent
    finally:
        rx.stop()
