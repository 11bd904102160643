"""Modules the layout moved keep their old import paths, with a DeprecationWarning naming the new one."""
import subprocess
import sys

import pytest

from smsrepl._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_gives_the_moved_module_and_says_where_it_went(old):
    code = (f"import warnings; warnings.simplefilter('always')\n"
            f"import {old} as m, {MOVED[old]} as n\n"
            f"assert m is n, (m, n)\n"
            f"import sys; assert sys.modules[{old!r}] is n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert f"{old} moved to {MOVED[old]}" in cp.stderr


def test_a_name_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        import smsrepl.no_such_module  # noqa: F401
