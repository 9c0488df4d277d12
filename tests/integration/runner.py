"""The test runner of the integration tests: named test functions that `-k` selects, fixtures
that build shared setup once (and only for the tests that run), checks, a watchdog, and the
summary line and exit code ctest reads (0 pass, 77 skip, 1 fail).

    T = H.TestRun("seek")                   # checks root, /dev/fuse, qemu tools, QCOWFS_BIN

    @T.fixture                              # built on first use, shared by later tests
    def images():
        ...
        return path                         # or `yield value` to clean up after the last test

    @T.test
    def test_cached_write_is_data():        # runs unless -k deselects it
        T.check("name", condition, "detail")    # one line per check
        with T.step("something"): ...       # an exception inside = one failed check

    T.run()                                 # runs the selected tests, prints "N passed, M failed"

Command line: `python3 test_x.py [-k PATTERN]... [--list]`. A test runs when its name contains
one of the patterns (case does not matter); --list prints the names of the tests. An exception
in a test, or in a fixture it uses, is one failed check named after the test. Module-level code
runs for --list too (without the root check): make images in fixtures, not there.
"""

import argparse
import contextlib
import functools
import inspect
import os
import random
import shutil
import sys
import threading
import time
import traceback

from compare import compare
from mounts import cleanup, live_mounts, qcowfs_bin

SKIP = 77


def preflight(need_loop=False):
    """Skips (77) if not root, no /dev/fuse, or qemu tools missing; fails (1) if QCOWFS_BIN is
    not an executable file."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not os.path.exists("/dev/fuse"):
        reasons.append("no /dev/fuse")
    for tool in ("qemu-img", "qemu-io", "fusermount3"):
        if shutil.which(tool) is None:
            reasons.append("%s missing" % tool)
    if reasons:
        print("SKIP: " + ", ".join(reasons), flush=True)
        sys.exit(SKIP)
    b = qcowfs_bin()
    if not b or not os.path.isfile(b) or not os.access(b, os.X_OK):
        print("FAIL: QCOWFS_BIN is not set to an executable qcowfs binary (got %r)" % b, flush=True)
        print("0 passed, 1 failed", flush=True)
        sys.exit(1)


def _parse_args(name):
    p = argparse.ArgumentParser(prog="test_%s.py" % name,
                                description="qcowfs integration test %s (needs root, /dev/fuse "
                                            "and QCOWFS_BIN=path/to/qcowfs)" % name)
    p.add_argument("-k", dest="patterns", action="append", default=[], metavar="PATTERN",
                   help="run only the tests whose name contains PATTERN (repeatable)")
    p.add_argument("--list", action="store_true", help="print the test names and exit")
    return p.parse_args()


class FixtureError(Exception):
    pass


class TestRun:
    def __init__(self, name, deadline=420, need_loop=False):
        self.name = name
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.failures = []
        self.tests = []          # (name, function) in definition order
        self._teardowns = []     # (fixture name, generator) in set-up order
        self._at_end = []
        self._seed = None
        self.args = _parse_args(name)
        self.t0 = time.monotonic()
        if self.args.list:
            return
        preflight(need_loop=need_loop)
        print("== %s (QCOWFS_BIN=%s)" % (name, qcowfs_bin()), flush=True)
        self._deadline = deadline
        t = threading.Thread(target=self._watchdog, daemon=True)
        t.start()

    # ---- registering tests and fixtures

    def test(self, fn):
        """Decorator: registers fn as a test named after the function."""
        self.tests.append((fn.__name__, fn))
        return fn

    def add_test(self, name, fn, *args):
        """Registers fn(*args) as a test called `name` (for tests made in a loop)."""
        self.tests.append((name, functools.partial(fn, *args) if args else fn))

    def at_end(self, fn):
        """Decorator: fn runs after the selected tests (before fixtures are torn down)."""
        self._at_end.append(fn)
        return fn

    def fixture(self, fn):
        """Decorator: fn(*args) runs once per distinct args, on first use; later calls return
        the same value. A generator function yields its value and is resumed (to clean up)
        after the last test. A fixture that failed fails every later use with its error."""
        results = {}

        @functools.wraps(fn)
        def get(*args):
            if args in results:
                ok, value = results[args]
                if not ok:
                    raise FixtureError("fixture %s failed earlier: %s" % (fn.__name__, value))
                return value
            try:
                if inspect.isgeneratorfunction(fn):
                    gen = fn(*args)
                    value = next(gen)
                    self._teardowns.append((fn.__name__, gen))
                else:
                    value = fn(*args)
            except Exception as e:
                results[args] = (False, "%s: %s" % (type(e).__name__, e))
                raise
            results[args] = (True, value)
            return value
        return get

    def seed(self):
        """The run's random seed: QCOWFS_TEST_SEED, or a new one; printed at the start and the
        end so that a failing run can be repeated."""
        if self._seed is None:
            self._seed = int(os.environ.get("QCOWFS_TEST_SEED") or
                             random.SystemRandom().randrange(1, 1 << 31))
            if not self.args.list:
                print("seed %d (repeat with QCOWFS_TEST_SEED=%d)" % (self._seed, self._seed),
                      flush=True)
            self.at_end(lambda: print("seed was %d" % self._seed, flush=True))
        return self._seed

    def build_all(self, builders):
        """Runs each (name, function) of builders; a failure is one failed check."""
        for name, fn in builders:
            with self.step("build %s" % name):
                fn()

    def selected(self, name):
        pats = self.args.patterns
        return not pats or any(p.lower() in name.lower() for p in pats)

    # ---- running

    def run(self):
        """Runs the selected tests in definition order, then the at_end hooks and the fixtures'
        clean-up; prints the summary and exits 0 (all passed) or 1."""
        if self.args.list:
            for name, _fn in self.tests:
                print(name)
            sys.exit(0)
        chosen = [(n, f) for n, f in self.tests if self.selected(n)]
        if not chosen:
            print("FAIL: no test matches -k %s; the tests are: %s" % (
                " -k ".join(self.args.patterns), ", ".join(n for n, _f in self.tests)), flush=True)
            print("0 passed, 1 failed", flush=True)
            sys.exit(1)
        if self.args.patterns:
            print("running %d of %d tests: %s" % (len(chosen), len(self.tests),
                                                  ", ".join(n for n, _f in chosen)), flush=True)
        for name, fn in chosen:
            print("---- %s" % name, flush=True)
            with self.step(name):
                fn()
        for fn in self._at_end:
            with self.step(fn.__name__):
                fn()
        while self._teardowns:
            name, gen = self._teardowns.pop()
            with self.step("clean-up of %s" % name):
                next(gen, None)
        self.finish()

    def _watchdog(self):
        time.sleep(self._deadline)
        print("FAIL: watchdog: %s still running after %ss (a hung mount?); killing qcowfs" % (
            self.name, self._deadline), flush=True)
        self.failed += 1
        for m in list(live_mounts):
            try:
                print("  qcowfs log tail: %s" % m.log_text()[-2000:], flush=True)
            except Exception:
                pass
        try:
            cleanup()
        except Exception:
            pass
        print("%d passed, %d failed%s" % (self.passed, self.failed,
                                          ", %d parts skipped" % self.skipped if self.skipped else ""), flush=True)
        os._exit(1)

    # ---- checks

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print("PASS: %s" % name, flush=True)
        else:
            self.failed += 1
            self.failures.append(name)
            print("FAIL: %s%s" % (name, (" -- " + str(detail)) if detail else ""), flush=True)
        return bool(ok)

    def skip(self, reason):
        """Says that a part of a test cannot run here, and why; the run goes on (a whole run
        that cannot run exits 77 through loops.skip)."""
        self.skipped += 1
        print("SKIP: %s" % reason, flush=True)

    def check_compare(self, name, view, ref, **kw):
        try:
            probs = compare(view, ref, **kw)
        except OSError as e:
            probs = ["%s" % e]
        return self.check(name, not probs, "; ".join(probs[:4]))

    @contextlib.contextmanager
    def step(self, name):
        """A block whose unexpected exception counts as one failed check (the block's own
        checks are counted separately)."""
        try:
            yield
        except Exception as e:
            detail = "%s: %s" % (type(e).__name__, e)
            tb = traceback.format_exc().strip().splitlines()
            where = [l.strip() for l in tb if l.strip().startswith("File ")][-1:]
            self.check(name, False, detail + ((" [" + where[0] + "]") if where else ""))

    def finish(self):
        dt = time.monotonic() - self.t0
        if self.failures:
            print("failed checks:", flush=True)
            for f in self.failures:
                print("  - %s" % f, flush=True)
        print("(%s took %.1fs)" % (self.name, dt), flush=True)
        cleanup()
        print("%d passed, %d failed%s" % (self.passed, self.failed,
                                          ", %d parts skipped" % self.skipped if self.skipped else ""), flush=True)
        sys.exit(0 if self.failed == 0 else 1)
