"""Target disk layout checks: will the planned target disks hold the source server?

Inputs are the control plane's own shapes: the source server's ``disks``
(5.3.2 ``ServerDisk``: name, partition_style, device_use, size, used_size,
physical_volumes, relation_name) plus its ``volume_groups``, and the planned
``target_server`` of a task (5.4.1 ``TargetServerByTask``: disks of
``TargetDisks`` with physical_volumes, volume_groups). Each broken rule is
reported with its SMS code, so a target-side helper stops a migration before
it writes to disks that cannot hold the source:

    SMS.1504  a target disk smaller than its source disk (block migration)
    SMS.6538  a partition or logical volume smaller than the space its data uses
    SMS.6539  partitions adding up to more than their disk
    SMS.6614  no room left on the disk beside its partitions (MBR: the first MiB)
    SMS.6612  a partition size that is not a whole number of MB
    SMS.6613  a GPT disk without its 33 MB reserve beside the partitions
    SMS.6532  the system disk not first
    SMS.6541  a volume group smaller than its logical volumes

Source and target disks are paired by the source disks' ``relation_name``
(the target disk's name) where the source gives them, else by order;
partitions by ``index``, else by order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smsrepl.errors import ConfigError

MB = 1 << 20
#: what an MBR disk keeps before its first partition (the partition table, aligned)
MBR_RESERVE = 1 * MB
#: GPT: the protective MBR, both GPT headers and partition arrays, aligned (SMS.6613)
GPT_RESERVE = 33 * MB


@dataclass(frozen=True)
class LayoutProblem:
    code: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.where}: {self.message}"


def _opt_int(obj: Mapping, key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative integer (bytes), got {value!r}")
    return value


def _int(obj: Mapping, key: str, where: str) -> int:
    value = _opt_int(obj, key, where)
    if value is None:
        raise ConfigError(f"{where}: {key} is missing")
    return value


def _list(obj: Mapping, key: str, where: str) -> list:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of objects")
    return value


def _pair(sources: Sequence[Mapping], targets: Sequence[Mapping], key: str) -> list[tuple[Mapping | None, Mapping]]:
    """Each target item with its source item: by ``key`` where both name it, else by position."""
    by_key = {s.get(key): s for s in sources if s.get(key)}
    out = []
    for i, t in enumerate(targets):
        s = by_key.get(t.get(key)) if t.get(key) in by_key else (sources[i] if i < len(sources) else None)
        out.append((s, t))
    return out


def _is_system(disk: Mapping) -> bool:
    if disk.get("device_use") in ("OS", "BOOT") or disk.get("os_disk") is True:
        return True
    return any(pv.get("device_use") in ("OS", "BOOT") or pv.get("mount_point") == "/"
               for pv in disk.get("physical_volumes") or [])


def check_layout(source_disks: Sequence[Mapping], target_server: object, *, task_type: str = "MIGRATE_BLOCK",
                 source_volume_groups: Sequence[Mapping] = ()) -> list[LayoutProblem]:
    """Every broken rule (see the module doc); an empty list means the layout can hold the source.

    Malformed input (a size that is not a non-negative integer, a disk list that is
    not a list, a target_server that is not an object) raises ConfigError naming the field."""
    if task_type not in ("MIGRATE_BLOCK", "MIGRATE_FILE"):
        raise ConfigError(f"task type must be MIGRATE_BLOCK or MIGRATE_FILE, got {task_type!r}")
    if not isinstance(target_server, Mapping):
        raise ConfigError("target_server must be an object (5.4.1 TargetServerByTask)")
    problems: list[LayoutProblem] = []
    targets = _list(target_server, "disks", "target_server")
    sources = list(source_disks)
    for i, disk in enumerate(sources):
        if not isinstance(disk, Mapping):
            raise ConfigError(f"source disks[{i}] must be an object (5.3.2 ServerDisk)")
    # a source disk's relation_name names its target disk (Linux); pair by it, else by order
    pairs: list[tuple[Mapping | None, Mapping]] = []
    related = {s.get("relation_name"): s for s in sources if s.get("relation_name")}
    for i, t in enumerate(targets):
        s = related.get(t.get("name")) or (sources[i] if i < len(sources) and not related else None)
        pairs.append((s, t))

    system = [i for i, t in enumerate(targets) if _is_system(t)]
    if system and system[0] != 0:
        problems.append(LayoutProblem("SMS.6532", f"target disk {targets[system[0]].get('name')!r}",
                                      f"the system disk must be the first disk; it is disk {system[0]}"))

    for s, t in pairs:
        where = f"target disk {t.get('name')!r}"
        size = _int(t, "size", where)
        if s is not None and task_type == "MIGRATE_BLOCK":
            ssize = _int(s, "size", f"source disk {s.get('name')!r}")
            if size < ssize:
                problems.append(LayoutProblem("SMS.1504", where, f"{size} bytes, smaller than source disk "
                                              f"{s.get('name')!r} of {ssize} bytes"))
        pvs = _list(t, "physical_volumes", where)
        spvs = _list(s, "physical_volumes", f"source disk {s.get('name')!r}") if s is not None else []
        total = 0
        for spv, pv in _pair(spvs, pvs, "index"):
            pwhere = f"{where} partition {pv.get('name') or pv.get('index')!r}"
            psize = _opt_int(pv, "size", pwhere)
            if psize is None:
                continue
            total += psize
            if psize % MB:
                problems.append(LayoutProblem("SMS.6612", pwhere, f"{psize} bytes is not a whole number of MB"))
            used = max(_opt_int(pv, "used_size", pwhere) or 0,
                       (_opt_int(spv, "used_size", pwhere) or 0) if spv is not None else 0)
            if psize < used:
                problems.append(LayoutProblem("SMS.6538", pwhere, f"{psize} bytes, less than the {used} bytes "
                                              "its data uses"))
        style = (s.get("partition_style") if s is not None else None) or t.get("partition_style") or "MBR"
        if total > size:
            problems.append(LayoutProblem("SMS.6539", where, f"partitions add up to {total} bytes, more than "
                                          f"the disk's {size}"))
        elif style == "GPT" and pvs and size - total < GPT_RESERVE:
            problems.append(LayoutProblem("SMS.6613", where, f"a GPT disk needs 33 MB beside its partitions; "
                                          f"{size - total} bytes are left"))
        elif pvs and size - total < MBR_RESERVE:
            problems.append(LayoutProblem("SMS.6614", where, f"the disk must be larger than its partitions "
                                          f"({total} bytes) by the partition table's {MBR_RESERVE} bytes"))

    svgs = {vg.get("name"): vg for vg in source_volume_groups if isinstance(vg, Mapping)}
    for vg in _list(target_server, "volume_groups", "target_server"):
        where = f"volume group {vg.get('name')!r}"
        vsize = _opt_int(vg, "size", where)
        lvs = _list(vg, "logical_volumes", where)
        slvs = {lv.get("name"): lv for lv in _list(svgs.get(vg.get("name"), {}), "logical_volumes", where)}
        lv_total = 0
        for lv in lvs:
            lwhere = f"{where} logical volume {lv.get('name')!r}"
            lsize = _int(lv, "size", lwhere)
            lv_total += lsize
            src = slvs.get(lv.get("name"), {})
            used = max(_opt_int(lv, "used_size", lwhere) or 0,
                       _opt_int(src, "used_size", lwhere) or 0)
            if lsize < used:
                problems.append(LayoutProblem("SMS.6538", lwhere, f"{lsize} bytes, less than the {used} bytes "
                                              "its data uses"))
        if vsize is not None and vsize < lv_total:
            problems.append(LayoutProblem("SMS.6541", where, f"{vsize} bytes, smaller than its logical volumes' "
                                          f"{lv_total}"))
    return problems


def check_task_layout(source_body: Mapping[str, Any], task_body: Mapping[str, Any]) -> list[LayoutProblem]:
    """Layout problems of a 5.4.1 task body for the source server of a 5.3.2 body."""
    if not isinstance(source_body, Mapping) or not isinstance(task_body, Mapping):
        raise ConfigError("expected the 5.3.2 source body and the 5.4.1 task body as objects")
    return check_layout(_list(source_body, "disks", "source"), task_body.get("target_server"),
                        task_type=task_body.get("type", "MIGRATE_BLOCK"),
                        source_volume_groups=_list(source_body, "volume_groups", "source"))
