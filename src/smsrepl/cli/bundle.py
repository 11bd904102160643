"""The certkey bundle a command names: ``--certkey FILE`` and its ``--passphrase-file``."""
from __future__ import annotations

import argparse

from smsrepl.cli.flags import state_home

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports

if TYPE_CHECKING:
    from smsrepl.transport.certkey import CertKey


def bundle_passphrase(args: argparse.Namespace) -> bytes | None:
    from smsrepl.transport.certkey import load_passphrase

    return load_passphrase(args.passphrase_file) if getattr(args, "passphrase_file", None) else None


def bundle_certkey(args: argparse.Namespace) -> CertKey:
    from smsrepl.transport.certkey import CertKey, ValidatedBundles

    # a sender starts for every round: a bundle validated before is not parsed again
    return CertKey.load(args.certkey, known=ValidatedBundles(state_home("validated-bundles")))
