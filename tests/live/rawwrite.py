"""Writes random 4 KiB blocks of a device with O_DIRECT, as another process: python rawwrite.py DEV COUNT SEED [FIRST END]."""
import mmap
import os
import random
import sys


def main() -> int:
    dev, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    nblocks = os.lseek(fd, 0, os.SEEK_END) // 4096
    first, end = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (0, nblocks)
    rnd = random.Random(seed)
    buf = mmap.mmap(-1, 4096)
    for _ in range(count):
        buf[:] = rnd.randbytes(4096)
        os.pwrite(fd, buf, rnd.randrange(first, end) * 4096)
    os.close(fd)
    print(count, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
