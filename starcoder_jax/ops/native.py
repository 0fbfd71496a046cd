"""Hand-written XLA:CPU kernels (ops/csrc), built for this machine on first use.

The kernels are C++ against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`). The first call of `load()` in an environment
compiles them with the system's C++ compiler (`$CXX`, else `c++`) for the
host's instruction set (`-march=native`: AVX2 where the CPU has it, a plain
loop otherwise) into a cache folder, and registers them with XLA for the
"cpu" platform. Later processes load the cached library. The cache key
covers the source, the compiler and its flags, jaxlib's version and the
CPU's feature flags, so a changed machine or jaxlib builds afresh; the
folder is `$STARCODER_JAX_NATIVE_CACHE`, else `$XDG_CACHE_HOME/starcoder_jax/native`
(`~/.cache/...`).

Where no compiler exists or the build fails, `available()` is False with
the reason in `unavailable_reason()`: the `auto` forms then take the XLA
forms (one warning a process), and forcing a native form raises with the
reason. Nothing here is used by programs compiled for GPUs or TPUs.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax

from starcoder_jax.ops.backend import cpu_flags

SOURCES = ("int4_rows.cc",)
# name registered with XLA -> symbol of the handler in the library
TARGETS = {"starcoder_jax_int4_rows": "StarcoderInt4Rows", "starcoder_jax_nf4_rows": "StarcoderNf4Rows"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    if os.environ.get("STARCODER_JAX_NATIVE_CACHE"):
        return Path(os.environ["STARCODER_JAX_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "starcoder_jax" / "native"


def _compiler() -> list[str] | None:
    cxx = shlex.split(os.environ.get("CXX", "") or "c++")
    return cxx if shutil.which(cxx[0]) else None


def _key(cxx: list[str], sources: list[Path]) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True).stdout
    for part in (version, " ".join(FLAGS), _jaxlib_version(), cpu_flags(), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:20]


def _jaxlib_version() -> str:
    import jaxlib
    return getattr(jaxlib, "__version__", "")


def _build() -> Path:
    """The library's path, compiled into the cache if it is not there yet."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler: set $CXX or install one (e.g. `apt-get install g++`)")
    sources = [Path(__file__).parent / "csrc" / name for name in SOURCES]
    folder = cache_dir() / _key(cxx, sources)
    lib = folder / "starcoder_jax_native.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:  # one build at a time (test workers, hosts)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
        os.close(fd)
        cmd = [*cxx, *FLAGS, "-I", jax.ffi.include_dir(), *map(str, sources), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building the CPU kernels failed ({shlex.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # whole or absent: a reader never sees half a library
    return lib


@functools.cache
def _load() -> tuple[bool, str]:
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        return False, str(e)
    return True, ""


def available() -> bool:
    """Whether the kernels are built (building them now if needed) and registered."""
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]


def require(what: str) -> None:
    """Raise with the reason when the kernels cannot be had (a forced native form)."""
    if not available():
        raise RuntimeError(f"{what} needs the native CPU kernels, which are unavailable: {unavailable_reason()}")


@functools.cache
def warn_unavailable(what: str) -> None:
    warnings.warn(f"{what}: the native CPU kernel is unavailable ({unavailable_reason()}); "
                  "running the slower XLA form", stacklevel=3)
