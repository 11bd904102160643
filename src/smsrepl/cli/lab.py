"""``smsrepl certs init`` and ``smsrepl demo``: a lab's certificate bundle, and the whole loop run
on this machine."""
from __future__ import annotations

from smsrepl.cli.bundle import bundle_passphrase


def cmd_certs_init(args) -> int:
    from smsrepl.lab.certs import check_certkey_slot, make_bundle, write_certkey

    passphrase = bundle_passphrase(args)
    check_certkey_slot(args.outdir, overwrite=args.force)  # before making keys for nothing
    path = write_certkey(args.outdir, make_bundle(passphrase), overwrite=args.force)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from smsrepl.lab.demo import run_demo

    return run_demo(size_mib=args.size_mib, keep=args.keep)
