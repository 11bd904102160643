"""The receiver's state of a target describes one device or image file: a target name pointed
at another one (a blank disk, an image deleted and made again by --create, one written over by
hand) is not taken for synced; its blocks, sampled, must hold what the manifest says, or the
state goes and the next round copies everything. A copy of the image elsewhere that holds the
same data is taken for it (a device renumbered after a reboot is the same case)."""
import shutil

import pytest

from smsrepl.lab.testdata import write_image

from .procs import ReceiverProc, send, sha256, summary

SIZE = 16 << 20
MIX = {"text": 0.5, "random": 0.5}


@pytest.fixture
def lab(tmp_path, certkey_file):
    src = str(tmp_path / "source.img")
    write_image(src, SIZE, seed=31, mix=MIX)
    procs = []

    def receiver(target: str) -> ReceiverProc:
        rx = ReceiverProc(certkey_file, {"disk0": target}, str(tmp_path / "rx"), verbose=True)
        procs.append(rx)
        return rx

    def round_(rx: ReceiverProc) -> dict:
        return summary(send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0"))

    yield {"src": src, "tmp": tmp_path, "receiver": receiver, "round": round_}
    for rx in procs:
        rx.stop()


def _rewrite(path: str, block: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(block * 4096)
        fh.write(b"\x77" * 4096)


def test_a_target_name_pointed_at_a_blank_image_gets_a_full_copy(lab):
    first = str(lab["tmp"] / "a.img")
    rx = lab["receiver"](first)
    assert lab["round"](rx)["kind"] == "full"
    rx.stop()
    other = str(lab["tmp"] / "b.img")  # the same name, another (blank) image: an edited --target
    rx = lab["receiver"](other)
    _rewrite(lab["src"], 10)
    again = lab["round"](rx)
    assert again["kind"] == "full" and again["data_bytes"] == SIZE, again
    assert sha256(lab["src"]) == sha256(other)
    assert any("differ from what its replication state says" in line for line in rx.log), rx.log


def test_an_image_deleted_and_made_again_by_create_gets_a_full_copy(lab):
    target = str(lab["tmp"] / "t.img")
    rx = lab["receiver"](target)
    assert lab["round"](rx)["kind"] == "full"
    (lab["tmp"] / "t.img").unlink()  # the receiver runs on; --create makes it again, all zeros
    again = lab["round"](rx)
    assert again["kind"] == "full" and again["data_bytes"] == SIZE, again
    assert sha256(lab["src"]) == sha256(target)


def test_a_target_written_over_by_hand_is_found_and_copied_again(lab):
    target = str(lab["tmp"] / "t.img")
    rx = lab["receiver"](target)
    assert lab["round"](rx)["kind"] == "full"
    with open(target, "r+b") as fh:  # dd if=/dev/urandom of=target: nothing told the receiver
        fh.write(bytes(range(256)) * (SIZE // 2 // 256))
    again = lab["round"](rx)
    assert again["kind"] == "full", again
    assert sha256(lab["src"]) == sha256(target)


def test_a_copy_of_the_image_elsewhere_holding_the_same_data_is_taken_for_it(lab):
    first = str(lab["tmp"] / "a.img")
    rx = lab["receiver"](first)
    assert lab["round"](rx)["kind"] == "full"
    rx.stop()
    moved = str(lab["tmp"] / "moved.img")
    shutil.copyfile(first, moved)  # another inode, the same blocks
    rx = lab["receiver"](moved)
    _rewrite(lab["src"], 10)
    again = lab["round"](rx)
    assert again["kind"] == "sync" and again["data_bytes"] == 4096, again
    assert sha256(lab["src"]) == sha256(moved)
    assert any("taken for it" in line for line in rx.log), rx.log


@pytest.mark.parametrize("bad", ["x", {"dev": 1}, [1, "two"], -5])
def test_a_state_with_a_damaged_target_id_is_checked_by_its_blocks_and_recorded_anew(lab, bad):
    """state.json's target_id edited or damaged by hand: no crash; the sampled blocks decide,
    and the target's own identity is recorded in its place."""
    import json

    target = str(lab["tmp"] / "t.img")
    rx = lab["receiver"](target)
    assert lab["round"](rx)["kind"] == "full"
    rx.stop()
    state = lab["tmp"] / "rx" / "disk0" / "state.json"
    rec = json.loads(state.read_text())
    good = rec["target_id"]
    state.write_text(json.dumps({**rec, "target_id": bad}))
    rx = lab["receiver"](target)
    _rewrite(lab["src"], 10)
    again = lab["round"](rx)
    assert again["kind"] == "sync" and again["data_bytes"] == 4096, again
    assert sha256(lab["src"]) == sha256(target)
    assert json.loads(state.read_text())["target_id"] == good
