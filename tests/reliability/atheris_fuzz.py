"""Coverage-guided fuzzing of one parser with atheris: atheris_fuzz.py NAME [libFuzzer flags].

Any exception other than the parser's documented errors ends the run with a crash report.
"""
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["smsrepl"]):
    from reliability.fuzz_targets import check_one, targets


def main() -> None:
    target = targets()[sys.argv[1]]

    def one(data: bytes) -> None:
        check_one(target, data)
        if target.fixup is not None:
            check_one(target, target.fixup(data))

    corpus = tempfile.mkdtemp(prefix="smsrepl-corpus-")  # the seeds start the search
    for i, seed in enumerate(target.seeds):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as fh:
            fh.write(seed)
    atheris.Setup([sys.argv[0], *sys.argv[2:], corpus], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
