"""The consistency result (5.4.13/5.4.14) that every check builds, block or file, local or remote.

``result_body`` is what ``smsrepl verify`` prints (a 5.4.13 result_list entry, plus ``notes``
when there is something to say, such as a rule that matched nothing); ``for_upload`` is the
5.4.14 body an agent sends: counts clamped to the reference's 0-1,000,000 and at most 30
entries, no notes (the reference has no field for them).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

#: the reference's limits on a ConsistencyResult (tables 5-214, 5-223)
MAX_COUNT = 1_000_000
MAX_ENTRIES = 30
COUNTS = ("num_total_files", "num_different_files", "num_target_miss_files", "num_target_more_files")


def entry(dir_check: str, total: int, different: int = 0, missing: int = 0, extra: int = 0) -> dict:
    """One ConsistencyResult: ``missing`` on the target, ``extra`` on the target only."""
    return {"dir_check": dir_check, "num_total_files": total, "num_different_files": different,
            "num_target_miss_files": missing, "num_target_more_files": extra}


def consistent(entries: Iterable[dict]) -> bool:
    return all(e["num_different_files"] == 0 and e["num_target_miss_files"] == 0
               and e["num_target_more_files"] == 0 for e in entries)


def result_body(entries: list[dict], *, notes: Iterable[str] = (), finished_ms: int | None = None) -> dict:
    body: dict[str, object] = {"finished_time": int(time.time() * 1000) if finished_ms is None else finished_ms,
            "check_result": "consistent" if consistent(entries) else "inconsistent",
            "consistency_result": entries}
    notes = list(notes)
    if notes:
        body["notes"] = notes
    return body


def for_upload(entries: Iterable[dict]) -> dict:
    """The 5.4.14 body: ``{"consistency_result": [...]}`` within the reference's limits."""
    out = []
    for e in list(entries)[:MAX_ENTRIES]:
        e = dict(e)
        e["dir_check"] = e["dir_check"][:1024]
        for key in COUNTS:
            e[key] = min(max(int(e[key]), 0), MAX_COUNT)
        out.append(e)
    return {"consistency_result": out}
