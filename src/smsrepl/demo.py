"""`smsrepl demo`: the whole loop on this machine with nothing prepared."""
from __future__ import annotations

import json
import shutil
import tempfile
import time


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(*, size_mib: int = 64, keep: bool = False) -> int:
    from .certs import make_bundle, write_certkey
    from .testdata import rewrite_random_blocks, write_image
    from .transport.receiver import Receiver
    from .transport.sender import Sender
    from .transport.tls import CertKey, client_context, server_context
    from .verify import compare_block_images

    work = tempfile.mkdtemp(prefix="smsrepl-demo-")
    try:
        _say(f"working directory: {work}")
        path = write_certkey(f"{work}/certs", make_bundle())
        bundle = CertKey.load(path)
        _say(f"1. certificates: a fresh CA, source and target certificates in {path}")

        source = f"{work}/source.img"
        mix = write_image(source, size_mib << 20, seed=7)
        _say(f"2. source disk image: {size_mib} MiB ({', '.join(f'{k} {v >> 20} MiB' for k, v in mix.items())})")

        rx = Receiver({"disk0": f"{work}/target.img"}, server_context(bundle), f"{work}/receiver-state")
        host, port = rx.start("127.0.0.1", 0)
        _say(f"3. receiver listening on {host}:{port} (mutual TLS 1.3), target disk0 -> {work}/target.img")
        try:
            def send():
                return Sender(source, "disk0", (host, port), client_context(bundle), f"{work}/sender-state").run()

            r = send()
            _say(f"4. full copy: {r.source_size >> 20} MiB in {r.seconds:.2f} s, "
                 f"{r.data_bytes >> 20} MiB of data sent as {r.wire_bytes / 2**20:.1f} MiB on the wire "
                 "(holes and zero blocks are not sent; zstd where it pays)")
            changed = rewrite_random_blocks(source, 0.01, seed=int(time.time()))
            _say(f"5. source changed: {changed >> 10} KiB rewritten in random 4 KiB blocks")
            r = send()
            _say(f"6. sync round {r.round_id}: {r.data_bytes >> 10} KiB of changed blocks, "
                 f"{r.wire_bytes >> 10} KiB on the wire, {r.seconds:.2f} s")
        finally:
            rx.stop()
        result, consistent = compare_block_images(source, f"{work}/target.img")
        _say("7. verification (5.4.13 consistency result):")
        _say(json.dumps(result, indent=2))
        _say("demo finished: target is byte-identical to the source" if consistent else "demo FAILED: copies differ")
        return 0 if consistent else 1
    finally:
        if keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
