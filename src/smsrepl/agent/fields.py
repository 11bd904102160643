"""The reference's field tables for every request body the data plane sends.

``body_problems(endpoint, body)`` lists what is wrong with a body: unknown
fields, missing required ones, wrong types, values out of range or outside
an enum. The fake control plane rejects a request with any problem; tests
fail on it. Tables (reference section, table):

- progress, 5.4.8 (5-184): smsrepl.control.progress.REPORT_FIELDS
- changestate, 5.3.6 (5-64): copystate / migrationcycle enums, and the pair
  must be one SMS.7728 allows
- command_result, 5.5.2 (5-250)
- consistency_result, 5.4.14 (5-222, 5-223)
- network_check, 5.9.1 (5-362)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from smsrepl.errors import ConfigError
from smsrepl.control.progress import report_problems
from smsrepl.control.state import CopyState, MigrationCycle, is_allowed

# field -> (kind, min, max, required, enum); kind: str, int, float, bool, object, array
Table = dict[str, tuple[str, float | None, float | None, bool, frozenset | None]]

COPYSTATES = frozenset({
    "UNAVAILABLE", "WAITING", "INIT", "REPLICATE", "SYNCING", "STOPPING", "STOPPED", "SKIPPING", "DELETING",
    "ERROR", "CLONING", "CUTOVERING", "FINISHED", "clearing", "cleared", "clearfailed", "premigready",
    "premiging", "premiged", "premigfailed"})
CYCLES = frozenset({"cutovering", "cutovered", "checking", "setting", "replicating", "syncing"})

CHANGESTATE: Table = {
    "copystate": ("str", 0, 255, False, COPYSTATES),
    "migrationcycle": ("str", 0, 255, False, CYCLES),
}
COMMAND_RESULT: Table = {
    "command_name": ("str", 0, 255, True,
                     frozenset({"START", "STOP", "DELETE", "SYNC", "SKIP", "UPLOAD_LOG", "RSET_LOG_ACL"})),
    "result": ("str", 0, 255, True, frozenset({"success", "fail"})),
    "result_detail": ("object", None, None, True, None),
}
CONSISTENCY: Table = {
    "consistency_result": ("array", 0, 30, False, None),
}
CONSISTENCY_ITEM: Table = {
    "dir_check": ("str", 0, 1024, True, None),
    "num_total_files": ("int", 0, 1_000_000, True, None),
    "num_different_files": ("int", 0, 1_000_000, True, None),
    "num_target_miss_files": ("int", 0, 1_000_000, True, None),
    "num_target_more_files": ("int", 0, 1_000_000, True, None),
}
NETWORK_CHECK: Table = {
    "domain_connectivity": ("bool", None, None, False, None),
    "destination_connectivity": ("bool", None, None, False, None),
    "network_delay": ("float", 0, 10000.0, True, None),
    "network_jitter": ("float", 0, 10000, True, None),
    "migration_speed": ("float", 0, 10000, True, None),
    "loss_percentage": ("float", 0, 100, True, None),
    "cpu_usage": ("float", 0, 100, True, None),
    "mem_usage": ("float", 0, 100, True, None),
    "evaluation_result": ("str", 6, 8, True, None),
}


def _within(value: float, lo: float | None, hi: float | None) -> bool:
    """``lo <= value <= hi``; a bound of None is no bound."""
    return (lo is None or lo <= value) and (hi is None or value <= hi)


def table_problems(table: Table, body: Any, where: str = "") -> list[str]:
    if not isinstance(body, Mapping):
        return [f"{where or 'body'}: expected an object, got {type(body).__name__}"]
    out = [f"{where}{k}: not a field of this body" for k in body if k not in table]
    for k, (kind, lo, hi, required, enum) in table.items():
        name = where + k
        if k not in body:
            if required:
                out.append(f"{name}: missing")
            continue
        v = body[k]
        if kind == "str":
            if not isinstance(v, str):
                out.append(f"{name}: expected a string, got {type(v).__name__}")
            elif not _within(len(v), lo, hi):
                out.append(f"{name}: length {len(v)} outside {lo}-{hi}")
            elif enum is not None and v not in enum:
                out.append(f"{name}: {v!r} is not one of {sorted(enum)}")
        elif kind == "bool":
            if not isinstance(v, bool):
                out.append(f"{name}: expected a boolean, got {type(v).__name__}")
        elif kind == "object":
            if not isinstance(v, Mapping):
                out.append(f"{name}: expected an object, got {type(v).__name__}")
        elif kind == "array":
            if not isinstance(v, list):
                out.append(f"{name}: expected an array, got {type(v).__name__}")
            elif not _within(len(v), lo, hi):
                out.append(f"{name}: {len(v)} items, allowed {lo}-{hi}")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                out.append(f"{name}: expected a number, got {type(v).__name__}")
            elif kind == "int" and not isinstance(v, int):
                out.append(f"{name}: expected an integer, got {v!r}")
            elif not math.isfinite(v) or not _within(v, lo, hi):
                out.append(f"{name}: {v!r} outside {lo}-{hi}")
    return out


def body_problems(endpoint: str, body: Any) -> list[str]:
    """Everything wrong with ``body`` as the request body of ``endpoint`` (empty: valid)."""
    if endpoint == "progress":
        return report_problems(body)
    if endpoint == "changestate":
        out = table_problems(CHANGESTATE, body)
        if not out and "copystate" in body and "migrationcycle" in body:
            try:
                ok = is_allowed(CopyState.parse(body["copystate"]), MigrationCycle.parse(body["migrationcycle"]))
            except ConfigError as exc:
                return [str(exc)]
            if not ok:
                out.append(f"copystate {body['copystate']} with migrationcycle {body['migrationcycle']} "
                           "is a pair SMS.7728 forbids")
        return out
    if endpoint == "command_result":
        return table_problems(COMMAND_RESULT, body)
    if endpoint == "consistency_result":
        out = table_problems(CONSISTENCY, body)
        if not out:
            for i, item in enumerate(body.get("consistency_result", [])):
                out += table_problems(CONSISTENCY_ITEM, item, f"consistency_result[{i}].")
        return out
    if endpoint == "network_check":
        return table_problems(NETWORK_CHECK, body)
    raise ValueError(f"no field table for {endpoint!r}")
