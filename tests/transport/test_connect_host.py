"""connect() reaches a receiver by an address or an ASCII name without the IDNA codec (a
sender's start), and a name IDNA cannot encode is one clear error, not a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from smsrepl.errors import ConnectError
from smsrepl.transport.connect import connect
from smsrepl.transport.tls import client_context


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_receiver_is_reached_by_address_and_by_name(receiver, bundle, host):
    _, port = receiver()
    stream = connect((host, port), client_context(bundle), timeout=10)
    stream.close()


def test_a_name_idna_cannot_encode_is_one_connect_error(bundle):
    with pytest.raises(ConnectError, match="host name is not valid"):
        connect(("bad..\u00e9xample", 9), client_context(bundle), timeout=2)


def test_connecting_by_address_does_not_load_the_idna_codec():
    code = ("import socket, sys\n"
            "from smsrepl.transport.connect import connect\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "try:\n"
            "    connect(('127.0.0.1', s.getsockname()[1]), None, timeout=5)\n"
            "except Exception:\n"
            "    pass\n"  # no TLS context: the TCP connection is what counts here
            "print('encodings.idna' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
