"""Secrets: owner-only files, and no key or passphrase in any log line or error message."""
import json
import os
import re
import stat
import subprocess

import pytest

from integration.procs import CLI, ReceiverProc, send_args

from smsrepl.lab.testdata import write_image

PASSPHRASE = "lab-Passphrase-9c2e-\u00e9t\u00e9"


@pytest.fixture
def locked_lab(tmp_path):
    """A passphrase-protected bundle made by `smsrepl certs init` under a permissive umask."""
    old = os.umask(0o022)
    try:
        pf = tmp_path / "pass"
        pf.write_text(PASSPHRASE)
        os.chmod(pf, 0o600)
        certs = tmp_path / "certs"
        cp = subprocess.run(CLI + ["certs", "init", str(certs), "--passphrase-file", str(pf)],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        src = tmp_path / "src.img"
        write_image(str(src), 8 << 20, seed=5, mix={"text": 0.5, "random": 0.5})
        yield {"tmp": tmp_path, "certs": certs, "ck": str(certs / "certkey.json"), "pass": str(pf), "src": str(src)}
    finally:
        os.umask(old)


def _secrets(lab) -> list[str]:
    """Strings that must never appear in output: the passphrase and every line of every key."""
    doc = json.loads(open(lab["ck"]).read())
    out = [PASSPHRASE]
    for name, pem in doc.items():
        if "key" in name:
            out += [line for line in pem.splitlines() if len(line) >= 16 and not line.startswith("-----")]
    assert len(out) > 3
    return out


def _owner_only(root) -> list[str]:
    loose = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o077:
                loose.append(f"{p} {stat.filemode(st.st_mode)}")
    st = os.stat(root)
    if st.st_mode & 0o077:
        loose.append(f"{root} {stat.filemode(st.st_mode)}")
    return loose


@pytest.mark.reliability("secrets", "keys, certkey and state files are owner-only")
def test_keys_and_state_files_are_owner_only_under_a_permissive_umask(locked_lab):
    lab = locked_lab
    old = os.umask(0o022)
    try:
        rx = ReceiverProc(lab["ck"], {"disk0": str(lab["tmp"] / "dst.img")}, str(lab["tmp"] / "rx-state"),
                          "--passphrase-file", lab["pass"])
        try:
            for _ in range(2):  # a full copy, then a sync round
                cp = subprocess.run(send_args(lab["src"], rx.address, lab["ck"], str(lab["tmp"] / "tx-state"),
                                              "disk0", "--passphrase-file", lab["pass"], "--dirty-map",
                                              str(lab["tmp"] / "dirty.map")),
                                    capture_output=True, text=True, timeout=120)
                assert cp.returncode == 0, cp.stderr
        finally:
            rx.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(lab["tmp"] / "dirty.map").st_mode) == 0o600
    assert _owner_only(lab["certs"]) == []
    assert _owner_only(lab["tmp"] / "rx-state") == []
    assert _owner_only(lab["tmp"] / "tx-state") == []


@pytest.mark.reliability("secrets", "no key or passphrase in logs or error messages")
def test_no_key_or_passphrase_in_verbose_logs_or_errors(locked_lab):
    lab = locked_lab
    dst = str(lab["tmp"] / "dst.img")
    outputs = []
    rx = ReceiverProc(lab["ck"], {"disk0": dst}, str(lab["tmp"] / "rx-state"), "--passphrase-file", lab["pass"],
                      verbose=True)
    try:
        def verbose(args):
            return CLI + ["-v"] + args[len(CLI):]

        base = verbose(send_args(lab["src"], rx.address, lab["ck"], str(lab["tmp"] / "tx-state"), "disk0"))
        runs = [
            base + ["--passphrase-file", lab["pass"], "--progress", "json"],  # a good session
            base,  # no passphrase for encrypted keys
        ]
        wrong = lab["tmp"] / "wrong"
        wrong.write_text(PASSPHRASE[::-1])
        runs.append(base + ["--passphrase-file", str(wrong)])
        # a damaged key: its parser must not echo the PEM back
        doc = json.loads(open(lab["ck"]).read())
        key_field = next(n for n in doc if "key" in n)
        doc[key_field] = doc[key_field].replace("\n", "\n" + "A" * 7, 3)
        damaged = lab["tmp"] / "damaged.json"
        damaged.write_text(json.dumps(doc))
        runs.append(verbose(send_args(lab["src"], rx.address, str(damaged), str(lab["tmp"] / "tx2"), "disk0",
                                      "--passphrase-file", lab["pass"])))
        codes = []
        for args in runs:
            cp = subprocess.run(args, capture_output=True, text=True, timeout=120)
            codes.append(cp.returncode)
            outputs += [cp.stdout, cp.stderr]
        verify = subprocess.run(CLI + ["verify", "block", lab["src"], "--to", rx.address, "--target", "disk0",
                                       "--certkey", lab["ck"], "--passphrase-file", lab["pass"]],
                                capture_output=True, text=True, timeout=120)
        outputs += [verify.stdout, verify.stderr]
    finally:
        rx.stop()
    outputs += rx.log
    assert codes[0] == 0 and all(c != 0 for c in codes[1:]), codes
    text = "\n".join(outputs)
    assert "SMS.3301" in text  # the refusals were reported, and both sides logged at INFO...
    assert "full round 1 of" in text and "for target disk0" in text
    for secret in _secrets(lab):
        assert secret not in text, f"a secret leaked into the output: {secret[:6]}..."
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
