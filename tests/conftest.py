"""Test session setup: 8 fake CPU devices, and no silent pass when nothing ran."""

import os

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


def pytest_sessionfinish(session, exitstatus):
    # pytest exits 5 when it collected no test; CI must not count that as green.
    if exitstatus == 5:
        session.exitstatus = 1
