"""The integration tests' helpers under one name (Python 3 standard library only):
`import harness as H`, then H.Mount, H.create, H.compare, ... Each lives in one module:

    runner.py    TestRun: named tests, -k selection, fixtures, checks, summary, exit codes
    procs.py     running commands (run, CmdError), errno names, child_read, wait_for
    mounts.py    temp dirs and cleanup, the mount table, Mount (qcowfs in the foreground)
    qemu.py      qemu-img and qemu-io: the image factory and the oracle (to_raw, qcheck, ...)
    qcow2.py     qcow2 host-file bytes: header fields, feature bits, L1/L2, refcounts, bitmaps
    fileops.py   sizes (KiB..TiB), fallocate, full preads and pwrites, errno-returning calls
    compare.py   the mount against the oracle: hashes, random preads, first differences
    dualfile.py  DualFile: every write to the mounted file and to a raw reference file
    loops.py     loop devices: skip without them, attach/mount bookkeeping, cleanup
    journal.py   the crash tests' journaling writer and what must read back after a crash

qemu-img is the oracle: every view file is compared against `qemu-img convert -O raw`.
Exit codes: 0 pass, 77 skip, anything else fail.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import *  # noqa: E402,F401,F403
from dualfile import *  # noqa: E402,F401,F403
from fileops import *  # noqa: E402,F401,F403
from loops import *  # noqa: E402,F401,F403
from mounts import *  # noqa: E402,F401,F403
from procs import *  # noqa: E402,F401,F403
from qcow2 import *  # noqa: E402,F401,F403
from qemu import *  # noqa: E402,F401,F403
from runner import *  # noqa: E402,F401,F403
