"""Full copy, sync rounds and resume with real processes and real TLS on loopback."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from smsrepl.lab.testdata import rewrite_random_blocks, write_image

from .procs import CuttingProxy, ReceiverProc, first_summary, send, send_args, sha256, summary

KILL_RUNS = int(os.environ.get("SMSREPL_KILL_RUNS", "3"))
CLI_VERIFY = [sys.executable, "-m", "smsrepl", "verify", "block"]
MIX = {"hole": 0.15, "zero": 0.05, "text": 0.35, "random": 0.35, "mixed": 0.10}


@pytest.fixture
def lab(tmp_path, certkey_file):
    src = str(tmp_path / "source.img")
    dst = str(tmp_path / "target.img")
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx-state"))
    env = {"src": src, "dst": dst, "rx": rx, "ck": certkey_file, "tx_state": str(tmp_path / "tx-state"), "tmp": tmp_path}
    yield env
    env["rx"].stop()  # the test may have replaced it with a restarted receiver


def _send(lab, *extra, **kw):
    return send(lab["src"], lab["rx"].address, lab["ck"], lab["tx_state"], "disk0", *extra, **kw)


def test_full_copy_then_sync_round_sends_only_changed_blocks(lab):
    size = 48 << 20
    write_image(lab["src"], size, seed=11, mix=MIX)
    first = summary(_send(lab))
    assert first["kind"] == "full" and first["resumed_from"] == 0
    assert sha256(lab["src"]) == sha256(lab["dst"])
    # holes and zero blocks are not sent as data
    assert first["data_bytes"] < size

    rewritten = rewrite_random_blocks(lab["src"], 0.01, seed=5)
    second = summary(_send(lab))
    assert second["kind"] == "sync"
    assert sha256(lab["src"]) == sha256(lab["dst"])
    assert second["data_bytes"] == rewritten
    assert second["wire_bytes"] <= 1.1 * rewritten + 0.0005 * size

    third = summary(_send(lab))
    assert third["kind"] == "sync" and third["data_bytes"] == 0
    assert third["wire_bytes"] < 0.0005 * size


def test_target_keeps_holes_for_zero_regions(lab):
    write_image(lab["src"], 32 << 20, seed=3, mix={"hole": 0.5, "zero": 0.5})
    summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])
    assert os.stat(lab["dst"]).st_blocks * 512 < (1 << 20)


def _kill_at_random(args, rng, lo, hi):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(rng.uniform(lo, hi))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _kill_runs():
    return range(KILL_RUNS)


def _kill_receiver_during_send(lab, rng, lo, hi):
    """Start a sender, kill -9 the receiver at a random moment, restart the receiver."""
    proc = subprocess.Popen(send_args(lab["src"], lab["rx"].address, lab["ck"], lab["tx_state"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(rng.uniform(lo, hi))
    lab["rx"].kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 3), err  # 3: transfer failed, resumable
    if proc.returncode == 3:
        assert err.startswith("SMS."), err
    lab["rx"] = ReceiverProc(lab["ck"], {"disk0": lab["dst"]}, str(lab["tmp"] / "rx-state"))


@pytest.mark.reliability("fault", "kill -9 of the sender at a random point")
@pytest.mark.parametrize("seed", _kill_runs())
def test_kill_sender_during_full_copy_then_resume(lab, seed):
    rng = random.Random(seed)
    size = 96 << 20
    write_image(lab["src"], size, seed=seed, mix=MIX)
    _kill_at_random(send_args(lab["src"], lab["rx"].address, lab["ck"], lab["tx_state"]), rng, 0.3, 1.2)
    result = first_summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])
    if result["kind"] == "full":
        assert result["data_bytes"] <= size - result["resumed_from"]


@pytest.mark.reliability("fault", "kill -9 of the receiver at a random point")
@pytest.mark.parametrize("seed", _kill_runs())
def test_kill_receiver_during_copy_then_restart_and_resume(lab, seed):
    rng = random.Random(100 + seed)
    size = 96 << 20
    write_image(lab["src"], size, seed=seed, mix=MIX)
    _kill_receiver_during_send(lab, rng, 0.3, 1.2)
    summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])


@pytest.mark.reliability("fault", "kill -9 during a sync round")
@pytest.mark.parametrize("seed", _kill_runs())
def test_kill_during_sync_round_then_resume(lab, seed):
    rng = random.Random(200 + seed)
    write_image(lab["src"], 64 << 20, seed=seed, mix=MIX)
    summary(_send(lab))
    rewrite_random_blocks(lab["src"], 0.3, seed=seed)
    if seed % 2:
        _kill_at_random(send_args(lab["src"], lab["rx"].address, lab["ck"], lab["tx_state"]), rng, 0.25, 0.8)
    else:
        _kill_receiver_during_send(lab, rng, 0.25, 0.8)
    summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])


@pytest.mark.reliability("fault", "connection cut at a random byte offset")
@pytest.mark.parametrize("seed", _kill_runs())
def test_connection_cut_at_random_offset_then_resume(lab, seed):
    rng = random.Random(300 + seed)
    size = 48 << 20
    write_image(lab["src"], size, seed=seed, mix=MIX)
    proxy = CuttingProxy(lab["rx"].port, rng.randrange(1000, 30 << 20))
    try:
        cut = send(lab["src"], f"127.0.0.1:{proxy.port}", lab["ck"], lab["tx_state"])
    finally:
        proxy.close()
    assert cut.returncode in (0, 3), cut.stderr
    if cut.returncode == 3:
        assert cut.stderr.startswith("SMS.")
    summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])


@pytest.mark.reliability("fault", "kill-and-resume campaign (random side, random point)")
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(50))
def test_kill_campaign(lab, seed):
    """50 kills of either side at random points (SMSREPL_SLOW=1)."""
    rng = random.Random(1000 + seed)
    size = 96 << 20
    write_image(lab["src"], size, seed=seed, mix=MIX)
    args = send_args(lab["src"], lab["rx"].address, lab["ck"], lab["tx_state"])
    if seed % 2:
        _kill_at_random(args, rng, 0.2, 1.5)
    else:
        _kill_receiver_during_send(lab, rng, 0.2, 1.5)
    summary(_send(lab))
    assert sha256(lab["src"]) == sha256(lab["dst"])


def _verify_remote(lab):
    cp = subprocess.run([*CLI_VERIFY, lab["src"], "--to", lab["rx"].address, "--target", "disk0",
                         "--certkey", lab["ck"]], capture_output=True, text=True, timeout=120)
    return cp.returncode, (json.loads(cp.stdout) if cp.stdout.strip() else None), cp.stderr


def test_remote_verify_block_counts_what_differs_and_touches_no_state(lab):
    size = 16 << 20
    write_image(lab["src"], size, seed=5, mix=MIX)
    code, result, err = _verify_remote(lab)  # nothing copied yet: every block counts as different
    assert code == 1 and result["check_result"] == "inconsistent", err
    assert result["consistency_result"][0]["num_different_files"] == size // 4096
    summary(_send(lab))
    before = sorted(os.listdir(lab["tx_state"] + "/disk0"))
    code, result, err = _verify_remote(lab)
    assert code == 0, err
    assert result["consistency_result"][0] == {"dir_check": "disk0", "num_total_files": size // 4096,
                                               "num_different_files": 0, "num_target_miss_files": 0,
                                               "num_target_more_files": 0}
    changed = rewrite_random_blocks(lab["src"], 0.01, seed=3)
    code, result, _ = _verify_remote(lab)
    assert code == 1 and result["consistency_result"][0]["num_different_files"] == changed // 4096
    assert sorted(os.listdir(lab["tx_state"] + "/disk0")) == before  # the sender's state is not verify's
    assert summary(_send(lab))["kind"] == "sync"
    assert _verify_remote(lab)[0] == 0 and sha256(lab["src"]) == sha256(lab["dst"])
    code, _, err = _verify_remote({**lab, "ck": lab["tmp"] / "missing.json"})
    assert code == 2 and "missing.json" in err


def test_both_endpoints_report_where_the_time_went(lab):
    write_image(lab["src"], 24 << 20, seed=8, mix={"text": 0.6, "random": 0.2, "hole": 0.2})
    first = summary(_send(lab))
    stages = first["stages"]
    assert set(stages) == {"read", "digest", "compress", "send"}
    assert stages["compress"] > 0 and stages["read"] > 0
    assert stages["compress"] < first["seconds"] * 3  # thread seconds: at most a few threads' worth of wall time
    deadline = time.monotonic() + 5
    while not any("stage seconds" in line for line in lab["rx"].log) and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [line for line in lab["rx"].log if "stage seconds" in line]
    for stage in ("receive", "decompress", "verify", "write", "flush"):
        assert f"{stage} " in line, line


@pytest.mark.parametrize("args,message", [
    (["{src}", "--to", "127.0.0.1:1"], "needs --target NAME and --certkey"),
    (["{src}", "{src}", "--to", "127.0.0.1:1"], "give TARGET, or --to"),
    (["{src}"], "give TARGET, or --to"),
])
def test_verify_block_usage_mistakes(lab, args, message):
    write_image(lab["src"], 1 << 20, seed=1)
    cp = subprocess.run([*CLI_VERIFY, *[a.format(src=lab["src"]) for a in args]], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 2 and message in cp.stderr, cp.stderr


@pytest.mark.parametrize("level", ["fast", "42", "-1"])
def test_send_level_must_be_a_zstd_level_or_auto(lab, level):
    write_image(lab["src"], 1 << 20, seed=1)
    for kind, src in (("block", lab["src"]), ("files", str(lab["tmp"]))):
        cp = subprocess.run([sys.executable, "-m", "smsrepl", "send", kind, "--json", src, "--to", lab["rx"].address,
                             "--target", "disk0", "--certkey", lab["ck"], "--level", level],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 2 and "--level" in cp.stderr, cp.stderr
    assert not os.path.exists(lab["dst"])
