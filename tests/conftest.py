import atexit
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The suite runs on the CPU platform, also where the chip extras (tpu, cuda) are
# installed: JAX would otherwise start looking for those chips in every process
# (about 2 s each). Tests that compile for a chip get its compile-only devices
# (parallel.chips), which need no platform of their own.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the run, shared with the subprocesses the
# tests start (CLI, notebooks, multi-device): many tests compile the very same
# programs (the same tiny models through fresh jit closures), and XLA:CPU
# compilation is most of the suite's time. A fresh directory per run keeps runs
# independent of each other; STARCODER_JAX_TEST_CACHE names a lasting one, in
# which each jaxlib and each CPU gets a folder of its own: JAX's cache key names
# the platform ("cpu") but not the instruction set the machine code was
# compiled for, so a folder shared by an AVX-512 and an AVX2 machine could hand
# the second code it cannot run.


def _machine_key() -> str:
    import hashlib
    import importlib.metadata
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"jaxlib-{importlib.metadata.version('jaxlib')}-cpu-{digest}"


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("STARCODER_JAX_TEST_CACHE")
    if _cache:
        _cache = os.path.join(_cache, _machine_key())
    else:
        _cache = tempfile.mkdtemp(prefix="starcoder-jax-xla-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if "jax" in sys.modules:  # imported before this file (a plugin): its config read the environment already
        import jax

        jax.config.update("jax_compilation_cache_dir", _cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from builders import builds_with_torch, make_hf_model, make_tokenizer  # noqa: E402

INTEROP_PACKAGES = ("torch", "transformers", "peft")
MISSING_INTEROP = [name for name in INTEROP_PACKAGES if importlib.util.find_spec(name) is None]


def _uses_a_torch_fixture(item) -> bool:
    """Whether a fixture in the item's closure is marked builds_with_torch."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(getattr(inspect.unwrap(fixturedef.func), "builds_with_torch", False)
               for fixturedefs in info.name2fixturedefs.values() for fixturedef in fixturedefs)


def pytest_collection_modifyitems(config, items):
    """Tests marked torch run only where torch, transformers and peft are
    installed (the test extra); tests marked gpu only where JAX's default
    backend is a GPU."""
    for item in items:
        if _uses_a_torch_fixture(item):
            item.add_marker(pytest.mark.torch)
    if MISSING_INTEROP:
        skip = pytest.mark.skip(reason=f"needs {', '.join(MISSING_INTEROP)} (the test extra)")
        for item in items:
            if item.get_closest_marker("torch"):
                item.add_marker(skip)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import jax

    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.default_backend()}")
        for item in gpu_items:
            item.add_marker(skip)


# The quick tier is every test not marked slow. Its wall time on 2 cores is kept
# under `quick_tier_budget` (pyproject.toml): a run that leaves the slow tests
# out lists its slowest tests at the end and fails past 1.25x the budget, so
# the tier cannot grow back unnoticed. Under pytest-xdist this runs in the
# controller, which sees every worker's reports.
BUDGET_SLACK = 1.25
SLOWEST_LISTED = 10


def pytest_addoption(parser):
    parser.addini("quick_tier_budget", "seconds of wall time the quick tier (-m 'not slow') may take on 2 CPU "
                  "cores; a quick run past 1.25x this fails", default="570")


def _is_quick_run(config) -> bool:
    """True when the -m expression keeps unmarked tests and leaves out slow ones."""
    expression = config.getoption("markexpr") or ""
    if not expression:
        return False
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expression)
    return compiled.evaluate(lambda name, **kwargs: False) and not compiled.evaluate(
        lambda name, **kwargs: name == "slow")


_SECONDS = defaultdict(float)  # test id -> seconds of setup, call and teardown
_STARTED = time.monotonic()


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid] += report.duration


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not _is_quick_run(config) or hasattr(config, "workerinput"):
        return
    budget = float(config.getini("quick_tier_budget"))
    elapsed = time.monotonic() - _STARTED
    config._budget_line = (f"quick tier: {elapsed:.0f} s of wall time, budget {budget:.0f} s "
                           f"(fails past {BUDGET_SLACK * budget:.0f} s)")
    if elapsed > BUDGET_SLACK * budget and session.exitstatus == pytest.ExitCode.OK:
        config._budget_line += ": over budget; move the slowest tests to the full tier or make them faster"
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# A test whose pytest-xdist worker dies (a fatal signal in native code, with
# faulthandler's stacks printed above the summary) runs once more in a fresh
# worker; a second death fails it. Each rerun is listed at the end of the run.
# The crashes this answers: segmentation faults inside jaxlib's executable
# serialization while the persistent compilation cache writes an entry, in the
# full run only (twice in the held-out-loss test of tests/ops/test_int4.py,
# once in tests/model/test_decode_head.py), none repeating on a rerun.
CRASH_RERUNS = 1
_CRASHES = defaultdict(int)  # test id -> worker deaths


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    _CRASHES[crashitem] += 1
    if _CRASHES[crashitem] <= CRASH_RERUNS:
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"  # neither passed nor failed: the rerun's report decides


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for nodeid, deaths in _CRASHES.items():
        verdict = "rerun in a new worker" if deaths <= CRASH_RERUNS else "failed"
        terminalreporter.write_line(f"worker crashed {deaths}x running {nodeid}: {verdict}", yellow=True)
    if hasattr(config, "workerinput") or not _SECONDS:
        return
    slowest = sorted(_SECONDS.items(), key=lambda kv: -kv[1])[:SLOWEST_LISTED]
    terminalreporter.write_sep("=", f"slowest {len(slowest)} tests (setup + call + teardown)")
    for nodeid, seconds in slowest:
        terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")
    line = getattr(config, "_budget_line", None)
    if line:
        terminalreporter.write_line(line, red="over budget" in line, green="over budget" not in line)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A StarCoder-style tokenizer (vocab 512, StarCoder's 19 special tokens at 0..18)."""
    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
@builds_with_torch
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A random multi-query HF model with the test tokenizer beside it."""
    from starcoder_jax.model.weights import copy_tokenizer_files

    out = make_hf_model(str(tmp_path_factory.mktemp("tiny_mqa")), vocab_size=512, n_positions=512)
    copy_tokenizer_files(tokenizer_dir, out)
    return out
