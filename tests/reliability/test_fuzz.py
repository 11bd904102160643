"""Fuzzing of every parser of untrusted input: only the documented errors may escape.

Default run: hypothesis, a small budget per parser. Long profile: SMSREPL_FUZZ_INPUTS=N
runs N mutated inputs per parser (1000000 for the issue's figure) and checks that memory
stays bounded; with atheris installed (`pip install '.[fuzz]'`) SMSREPL_FUZZ_ATHERIS=N also
runs N coverage-guided inputs per parser in a subprocess.
"""
import os
import subprocess
import sys
import zlib

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .fuzz_targets import check_one, mutate, run_inputs, targets

TARGETS = targets()
NAMES = sorted(TARGETS)
LONG = int(os.environ.get("SMSREPL_FUZZ_INPUTS", "0"))
ATHERIS = int(os.environ.get("SMSREPL_FUZZ_ATHERIS", "0"))


@pytest.mark.reliability("fuzzing", "parsers, hypothesis (default run)")
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parser_refuses_bad_input_only_with_documented_errors(name, data):
    target = TARGETS[name]
    if data.draw(st.booleans(), label="raw bytes"):
        blob = data.draw(st.binary(max_size=600))
    else:
        seed = data.draw(st.sampled_from(target.seeds))
        blob = mutate(seed, data.draw(st.randoms(use_true_random=False)), target.seeds)
        if target.fixup is not None and data.draw(st.booleans(), label="repair checks"):
            blob = target.fixup(blob)
    check_one(target, blob)


@pytest.mark.reliability("fuzzing", "parsers, mutation fuzzer (long profile)")
@pytest.mark.skipif(not LONG, reason="long fuzzing profile: set SMSREPL_FUZZ_INPUTS=1000000 to run it")
@pytest.mark.parametrize("name", NAMES)
def test_long_profile_mutation_fuzzing(name, record_property):
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    result = run_inputs(TARGETS[name], LONG, seed=zlib.crc32(name.encode()))
    grown = (proc.memory_info().rss - rss0) / 2**20
    record_property("tries", result["inputs"])
    print(f"{name}: {result} rss +{grown:.1f} MiB")
    assert grown < 64, f"memory grew {grown:.0f} MiB over {LONG} inputs"


@pytest.mark.reliability("fuzzing", "parsers, atheris coverage-guided (long profile)")
@pytest.mark.skipif(not ATHERIS, reason="atheris profile: pip install '.[fuzz]' and set SMSREPL_FUZZ_ATHERIS=N")
@pytest.mark.parametrize("name", NAMES)
def test_atheris_fuzzing(name, record_property, tmp_path):
    pytest.importorskip("atheris", reason="atheris does not install here")
    driver = os.path.join(os.path.dirname(__file__), "atheris_fuzz.py")
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    cp = subprocess.run([sys.executable, driver, name, f"-runs={ATHERIS}", "-rss_limit_mb=1024", "-max_len=4096",
                         f"-artifact_prefix={crashes}/"], capture_output=True, text=True, timeout=3600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    record_property("tries", ATHERIS)
