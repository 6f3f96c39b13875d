"""Test session setup: 8 fake CPU devices, and no silent pass when nothing ran or when a test
was skipped in CI without being allowed to (tests/skips_allowed.txt)."""

import fnmatch
import os
from pathlib import Path

# Must happen before JAX initialises its backends: every test sees 8 CPU devices, so
# sharding tests can build real meshes; single-device code simply uses device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A persistent compilation cache shared by the test process and the subprocesses it starts:
# the same tiny train steps are compiled by many tests.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# The files that cost most (seconds on 2 cores, cold caches, from `--durations`), run first: with
# one file per worker (`--dist loadfile --no-loadscope-reorder`) the heavy ones then overlap
# instead of one of them finishing alone at the end. The rest follow in name order.
HEAVY_FIRST = (
    "test_hfd.py",  # 300: the fit check (both stages, 150 + 400 steps), η sweep, seams
    "test_train.py",  # 270: eight devices, CLI resume, SIGKILL resume
    "test_sharding.py",  # 230: FSDP 8 vs 1 device, remat
    "test_resulic.py",  # 220: both stages with captions, prompt search
    "test_diffo.py",  # 215: both stages, two rate points
    "test_ldm.py",  # 160: the backbone, RDEIC on it
    "test_rdeic.py",  # 160: both stages, fresh-process files
    "test_diffcr.py",  # 125: both stages, fresh-process files
    "test_multiprocess.py",  # 90: two processes against one
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


SKIPS_ALLOWED = Path(__file__).with_name("skips_allowed.txt")
_skipped: list[tuple[str, str]] = []


def _allowed_skips() -> list[str]:
    """Node-id patterns of tests CI may skip; every line must give its reason after ' :: '."""
    patterns = []
    for line in SKIPS_ALLOWED.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(" :: ")
        if not sep or not reason.strip():
            raise ValueError(f"{SKIPS_ALLOWED.name}: {line!r} gives no reason after ' :: '")
        patterns.append(pattern.strip())
    return patterns


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def _unexpected_skips() -> list[tuple[str, str]]:
    allowed = _allowed_skips()
    return [(n, r) for n, r in _skipped if not any(fnmatch.fnmatch(n, p) for p in allowed)]


def pytest_terminal_summary(terminalreporter):
    if _in_ci() and (unexpected := _unexpected_skips()):
        terminalreporter.section("skipped in CI without an entry in tests/skips_allowed.txt")
        for nodeid, reason in unexpected:
            terminalreporter.line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    # pytest exits 5 when it collected no test; CI must not count that as green.
    if exitstatus == 5:
        session.exitstatus = 1
    # In CI every skip must be allowed by name, with its reason: parity tests must run.
    if _in_ci() and _unexpected_skips():
        session.exitstatus = 1
