"""Target disk layout rules, each in a test of its own, and the reference's own examples."""
import copy

import pytest

from smsrepl.errors import ConfigError
from smsrepl.agent.layout import GPT_RESERVE, MB, check_layout, check_task_layout

# reference 4.1, step 2 (5.3.2 body, disks part) and step 3 (5.4.1 body, target_server), as printed
REF_41_SOURCE = {"os_type": "LINUX", "name": "bike-centos", "disks": [{
    "name": "/dev/vda", "size": 42949672960, "device_use": "BOOT", "partition_style": "MBR",
    "physical_volumes": [{"name": "/dev/vda1", "size": 42948624384, "device_use": "OS", "used_size": 2854862848,
                          "inode_size": 256, "file_system": "ext4", "mount_point": "/"}]}], "volume_groups": []}
REF_41_TASK = {"name": "MigrationTask", "os_type": "WINDOWS", "type": "MIGRATE_BLOCK", "target_server": {
    "name": "name", "vm_id": "6dac09d8-5835-4888-xxxx-787453c4e1d4", "btrfs_list": None, "disks": [
        {"device_use": "OS", "disk_id": "354419d9", "name": "Disk 0", "size": 42949672960, "used_size": 42949672960,
         "physical_volumes": [
             {"device_use": "BOOT", "file_system": "NTFS", "index": 1, "name": "(Reserved)", "size": 367001600,
              "used_size": 31244288},
             {"device_use": "OS", "file_system": "NTFS", "index": 2, "name": "C:\\", "size": 42580574208,
              "used_size": 16148279296}]},
        {"device_use": "NORMAL", "disk_id": "ef409e5f", "name": "Disk 1", "size": 53687091200,
         "used_size": 53687091200, "physical_volumes": [
             {"file_system": "NTFS", "index": 1, "name": "D:\\", "size": 53684994048, "used_size": 3462647808}]}]}}
REF_541_TASK = {"name": "MigrationTask", "type": "MIGRATE_FILE", "os_type": "LINUX", "target_server": {
    "vm_id": "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxx0001", "name": "Auto-tar-name", "volume_groups": [], "disks": [{
        "name": "/dev/vda", "disk_id": "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxx0001", "size": 42949672960,
        "used_size": 429496, "device_use": "BOOT", "physical_volumes": [{
            "uuid": None, "index": 0, "name": "/dev/vda1", "device_use": "OS", "file_system": "ext4",
            "mount_point": "/", "size": 42947575808, "used_size": 5346484224}]}]}}


def codes(problems):
    return sorted(p.code for p in problems)


def linux_pair():
    src = copy.deepcopy(REF_41_SOURCE)
    task = copy.deepcopy(REF_541_TASK)
    task["type"] = "MIGRATE_BLOCK"
    return src, task


def test_reference_examples_are_valid():
    assert check_task_layout(REF_41_SOURCE, REF_541_TASK) == []
    # 4.1's Windows target with a two-disk Windows source of the same sizes
    win_source = {"disks": [{"name": d["name"], "size": d["size"], "device_use": d["device_use"],
                             "partition_style": "MBR", "physical_volumes": d["physical_volumes"]}
                            for d in REF_41_TASK["target_server"]["disks"]]}
    assert check_task_layout(win_source, REF_41_TASK) == []


def test_sms_1504_target_disk_smaller_than_source():
    src, task = linux_pair()
    task["target_server"]["disks"][0]["size"] = 39 << 30  # the source disk is 40 GiB
    task["target_server"]["disks"][0]["physical_volumes"][0]["size"] = (39 << 30) - 2 * MB
    assert "SMS.1504" in codes(check_task_layout(src, task))
    task["type"] = "MIGRATE_FILE"  # file-level migration may shrink a disk whose data fits
    assert "SMS.1504" not in codes(check_task_layout(src, task))


def test_sms_6538_partition_smaller_than_its_used_space():
    src, task = linux_pair()
    task["target_server"]["disks"][0]["physical_volumes"][0]["size"] = 2 << 30  # source uses 2.66 GiB
    assert codes(check_task_layout(src, task)) == ["SMS.6538"]


def test_sms_6538_logical_volume_smaller_than_its_used_space():
    src, task = linux_pair()
    src["volume_groups"] = [{"name": "vg0", "size": 10 << 30, "logical_volumes": [
        {"name": "lv_data", "size": 8 << 30, "used_size": 6 << 30, "file_system": "xfs", "mount_point": "/data"}]}]
    task["target_server"]["volume_groups"] = [{"name": "vg0", "size": 10 << 30, "logical_volumes": [
        {"name": "lv_data", "size": 5 << 30, "file_system": "xfs", "mount_point": "/data", "used_size": 0,
         "free_size": 0, "inode_size": 0}]}]
    assert codes(check_task_layout(src, task)) == ["SMS.6538"]


def test_sms_6539_partitions_larger_than_the_disk():
    src, task = linux_pair()
    disk = task["target_server"]["disks"][0]
    disk["physical_volumes"].append({"index": 1, "name": "/dev/vda2", "size": 1024 * MB, "used_size": 0})
    assert codes(check_task_layout(src, task)) == ["SMS.6539"]


def test_sms_6614_no_room_beside_the_partitions():
    src, task = linux_pair()
    disk = task["target_server"]["disks"][0]
    disk["physical_volumes"][0]["size"] = disk["size"]  # exactly the disk: no partition table
    assert codes(check_task_layout(src, task)) == ["SMS.6614"]


def test_sms_6612_partition_size_not_whole_mb():
    src, task = linux_pair()
    task["target_server"]["disks"][0]["physical_volumes"][0]["size"] -= 4096
    assert codes(check_task_layout(src, task)) == ["SMS.6612"]


def test_sms_6613_gpt_reserve():
    src, task = linux_pair()
    src["disks"][0]["partition_style"] = "GPT"
    assert codes(check_task_layout(src, task)) == ["SMS.6613"]  # 2 MB left beside the partition
    task["target_server"]["disks"][0]["physical_volumes"][0]["size"] = (
        task["target_server"]["disks"][0]["size"] - GPT_RESERVE)
    assert check_task_layout(src, task) == []


def test_sms_6532_system_disk_not_first():
    src, task = linux_pair()
    data = {"name": "/dev/vdb", "size": 10 << 30, "used_size": 0, "device_use": "NORMAL",
            "physical_volumes": [{"index": 0, "name": "/dev/vdb1", "size": (10 << 30) - 2 * MB, "used_size": 0}]}
    task["target_server"]["disks"].insert(0, data)
    src["disks"][0]["relation_name"] = "/dev/vda"  # pairing by name, not by order
    src["disks"].append({"name": "/dev/vdb", "relation_name": "/dev/vdb", "size": 10 << 30, "device_use": "NORMAL",
                         "used_size": 0, "physical_volumes": []})
    assert codes(check_task_layout(src, task)) == ["SMS.6532"]


def test_sms_6541_volume_group_smaller_than_its_logical_volumes():
    src, task = linux_pair()
    task["target_server"]["volume_groups"] = [{"name": "vg0", "size": 10 << 30, "logical_volumes": [
        {"name": "a", "size": 6 << 30}, {"name": "b", "size": 6 << 30}]}]
    assert codes(check_task_layout(src, task)) == ["SMS.6541"]


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t["target_server"]["disks"][0].__setitem__("size", "42949672960"), "size must be a non-negative"),
    (lambda t: t["target_server"].__setitem__("disks", {"a": 1}), "disks must be a list"),
    (lambda t: t["target_server"]["disks"][0].pop("size"), "size is missing"),
    (lambda t: t.__setitem__("type", "MIGRATE_VM"), "MIGRATE_BLOCK or MIGRATE_FILE"),
])
def test_malformed_bodies_name_the_field(mutate, match):
    src, task = linux_pair()
    mutate(task)
    with pytest.raises(ConfigError, match=match):
        check_task_layout(src, task)
