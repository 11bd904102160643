"""The certkey bundle a command names: ``--certkey FILE`` and its ``--passphrase-file``."""
from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from smsrepl.cli.flags import state_home

if TYPE_CHECKING:
    from smsrepl.transport.certkey import CertKey


def bundle_passphrase(args: argparse.Namespace) -> bytes | None:
    from smsrepl.transport.certkey import load_passphrase

    return load_passphrase(args.passphrase_file) if getattr(args, "passphrase_file", None) else None


def bundle_certkey(args: argparse.Namespace) -> CertKey:
    from smsrepl.transport.certkey import CertKey, ValidatedBundles

    # a sender starts for every round: a bundle validated before is not parsed again
    return CertKey.load(args.certkey, known=ValidatedBundles(state_home("validated-bundles")))
