import os

import pytest

from smsrepl.lab.certs import make_bundle, write_certkey


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SMSREPL_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow campaign: set SMSREPL_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundle():
    return make_bundle()


@pytest.fixture(scope="session")
def certkey_file(tmp_path_factory, bundle):
    return str(write_certkey(tmp_path_factory.mktemp("certs"), bundle))


# --- RELIABILITY.md: what was tried, how often, and how it ended -------------------------
# A test marked ``@pytest.mark.reliability("area", "case")`` is one row of the table;
# parametrized instances of it count as tries, and a test that drives many inputs or runs
# itself says how many with ``record_property("tries", n)``. Set SMSREPL_RELIABILITY_OUT
# to a file to append one JSON line per such test; tests/reliability_report.py renders it.
_reliability_rows: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(area, case): a row of RELIABILITY.md")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("reliability")
    if mark is None or not os.environ.get("SMSREPL_RELIABILITY_OUT"):
        return
    if report.when == "teardown":
        if report.failed:  # a fixture's check after the test (e.g. nothing written outside the target)
            for row in reversed(_reliability_rows):
                if row["test"] == item.nodeid:
                    row["outcome"], row["reason"] = "failed", "teardown: " + str(report.longrepr).strip().splitlines()[-1][:200]
                    break
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tries = dict(item.user_properties).get("tries")
        if tries is None:  # a hypothesis test: its example budget
            hyp = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
            tries = hyp.max_examples if hyp is not None else 1
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        elif report.failed:
            reason = str(report.longrepr).strip().splitlines()[-1][:200] if report.longrepr else ""
        _reliability_rows.append({"area": mark.args[0], "case": mark.args[1], "test": item.nodeid,
                                  "outcome": report.outcome, "tries": int(tries), "reason": reason,
                                  "seconds": round(report.duration, 2),
                                  "backend": os.environ.get("SMSREPL_BACKEND", "native")})


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("SMSREPL_RELIABILITY_OUT")
    if out and _reliability_rows:
        import json

        with open(out, "a") as fh:
            for row in _reliability_rows:
                fh.write(json.dumps(row) + "\n")
