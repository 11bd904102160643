import os

import pytest

from smsrepl.certs import make_bundle, write_certkey


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
