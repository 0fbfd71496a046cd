"""Runs untrusted programs: a fresh directory, a process group of their own, OS limits.

What holds a sample in (outermost first):
- a fresh temporary directory is its cwd, HOME and TMPDIR, removed afterwards;
- the environment is an allowlist (PATH, LANG, HOME, TMPDIR): no tokens leak in;
- stdin is /dev/null; stdout / stderr go to files beside (not inside) that
  directory, capped by RLIMIT_FSIZE, so a flood of output cannot fill memory;
- setrlimit: CPU seconds, address space, file size, process count, no core files;
- a new session, so the whole process group is SIGKILLed after every step
  (on timeout, and also on a normal exit, to take leftover children with it);
- optionally an unprivileged user (`user="nobody"`): as root RLIMIT_NPROC is
  not enforced and every file is writable, so run as root only with `user`;
- Python programs also run under `_guard.install`, which refuses destructive
  calls (see there; that part is a seat belt, not a wall).

Not covered: network access, and reading files the user may read. Untrusted
code at scale belongs in a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pwd
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from starcoder_jax.eval import _guard

STATUSES = ("passed", "failed", "timeout", "error")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_SENTINEL_TAIL_BYTES = 4096
_GUARD_SOURCE = inspect.getsource(_guard)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-process limits of one step.

    timeout_s: wall-clock seconds before the process group is killed.
    cpu_s: CPU seconds (RLIMIT_CPU); default timeout_s + 1, so that wall time
      normally decides and CPU time only catches busy multi-threaded runs.
    memory_mb: address space in MiB (RLIMIT_AS); None for no limit.
    file_mb: largest file the program may write, stdout included (RLIMIT_FSIZE).
    processes: RLIMIT_NPROC headroom above the processes its user already has
      (the kernel counts all of the user's processes; root is exempt).
    output_chars: characters of stdout (head) and stderr (tail) kept in the result.
    """

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int | None = 2048
    file_mb: int = 64
    processes: int = 64
    output_chars: int = 2000

    def __post_init__(self):
        for name in ("timeout_s", "file_mb", "processes", "output_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)}")
        for name in ("cpu_s", "memory_mb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Limits.{name} must be > 0 or None, got {value}")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command run in the sandbox directory.

    build: a compile step; its failure makes the status "error" (the program
    never ran) and later steps are skipped.
    """

    argv: tuple[str, ...]
    limits: Limits = Limits()
    build: bool = False


@dataclasses.dataclass(frozen=True)
class Program:
    """Files written into a fresh directory, then steps run there in order.

    sentinel: if set, the last step passes only if it exits 0 AND this string
    is in the tail of its stdout (proof that the program reached its end, so
    that an early `sys.exit(0)` is not a pass).
    """

    files: Mapping[str, str]
    steps: tuple[Step, ...]
    sentinel: str | None = None


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How a program ended. exit_code: negative = killed by that signal; None = never started."""

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict:
        return {"passed": self.passed, **dataclasses.asdict(self)}


def default_workers() -> int:
    return os.cpu_count() or 1


def python_program(source: str, *, python: str | None = None, limits: Limits | None = None) -> Program:
    """A Python program run under the guard prelude, with an end-of-program sentinel.

    python: the interpreter (default: this one); it runs with -I (isolated: no
    PYTHON* variables, no user site, no cwd on sys.path).
    """
    sentinel = f"sandbox-reached-end-{uuid.uuid4().hex}"
    runner = "\n".join([
        _GUARD_SOURCE,
        "install(os.getcwd())",
        "import runpy",
        "runpy.run_path('program.py', run_name='__main__')",
        f"print({sentinel!r}, flush=True)",
    ])
    step = Step((python or sys.executable, "-I", "-c", runner), limits or Limits())
    return Program({"program.py": source}, (step,), sentinel=sentinel)


def run_program(program: Program, *, user: str | None = None) -> RunResult:
    """Runs `program` in a fresh temporary directory; never raises for the program's faults.

    user: run as this (unprivileged) user; needs root. The sandbox directory
    is handed to that user.
    """
    if not program.steps:
        raise ValueError("program has no steps; expected at least the run step")
    ids = _user_ids(user)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="starcoder-eval-", ignore_cleanup_errors=True) as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        _write_files(work, program.files)
        if ids is not None:
            _hand_over(root, work, *ids)
        for index, step in enumerate(program.steps):
            last = index == len(program.steps) - 1
            status, code, out, err = _run_step(step, work, root, ids,
                                               program.sentinel if last else None)
            if status != "passed" or last:
                if status == "failed" and step.build:
                    status = "error"
                return RunResult(status, code, out, err, time.monotonic() - start)
    raise AssertionError("unreachable: the last step always returns")


def run_programs(programs: Sequence[Program], *, workers: int | None = None, user: str | None = None,
                 progress: Callable[[], None] | None = None) -> list[RunResult]:
    """Runs programs in parallel threads (each waits on its own subprocess); results in input order.

    progress: called once per finished program (e.g. a tqdm bar's update).
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _user_ids(user)  # fail once, up front, on a bad user

    def one(program):
        result = run_program(program, user=user)
        if progress is not None:
            progress()
        return result

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        # JAX, once loaded, warns on every fork that a threaded process may deadlock the
        # child; ours only calls setrlimit and exec (see _run_step), so the warning is noise.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        return list(pool.map(one, programs))


def _user_ids(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    if os.geteuid() != 0:
        raise PermissionError(f"user={user!r} needs root to switch users; this process runs as "
                              f"uid {os.geteuid()}")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"user={user!r}: no such user on this machine") from None
    if entry.pw_uid == 0:
        raise ValueError(f"user={user!r} is root; expected an unprivileged user such as 'nobody'")
    return entry.pw_uid, entry.pw_gid


def _write_files(work: str, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        if os.path.isabs(name) or ".." in name.split("/"):
            raise ValueError(f"program file name {name!r} must be relative, inside the sandbox")
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _hand_over(root: str, work: str, uid: int, gid: int) -> None:
    # The user must traverse root (absolute paths to its cwd) but not list or write it.
    os.chmod(root, 0o711)
    for parent, _dirs, files in os.walk(work):
        os.chown(parent, uid, gid)
        for name in files:
            os.chown(os.path.join(parent, name), uid, gid)


def _environment(work: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", _DEFAULT_PATH), "LANG": "C.UTF-8",
            "HOME": work, "TMPDIR": work}


def _run_step(step: Step, work: str, root: str, ids: tuple[int, int] | None,
              sentinel: str | None) -> tuple[str, int | None, str, str]:
    """(status, exit code, stdout head, stderr tail) of one step."""
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    uid = os.getuid() if ids is None else ids[0]
    preexec = _limit_setter(step.limits, _process_limit(uid, step.limits.processes))
    identity = {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": []}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            # preexec_fn with threads around (ours, JAX's): between fork and exec the child
            # runs only Python's own after-fork hooks and setrlimit (C; no imports, no locks
            # of ours), so it cannot wait on a lock another thread held at fork time.
            proc = subprocess.Popen(step.argv, cwd=work, env=_environment(work), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=preexec, **identity)  # noqa: PLW1509 (see above)
        except (OSError, subprocess.SubprocessError) as error:
            return "error", None, "", f"could not start {step.argv[0]}: {error}"
        finished = _wait_unreaped(proc.pid, step.limits.timeout_s)
        _kill_group(proc.pid)  # the leader is a zombie (unreaped): its group id cannot be reused yet
        code = proc.wait()
    keep = step.limits.output_chars
    stdout, stderr = _read_head(out_path, keep), _read_tail(err_path, keep)
    if not finished or code == -signal.SIGXCPU:
        return "timeout", code, stdout, stderr + f"\n[sandbox] killed after {step.limits.timeout_s:g}s"
    if code != 0:
        return "failed", code, stdout, stderr
    if sentinel is not None:
        if sentinel not in _read_tail(out_path, _SENTINEL_TAIL_BYTES):
            return "failed", code, stdout, stderr + "\n[sandbox] exited 0 before the end of the program"
        stdout = stdout.replace(sentinel + "\n", "")
    return "passed", code, stdout, stderr


def _limit_setter(limits: Limits, nproc: int) -> Callable[[], None]:
    cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s + 1)
    wanted = [
        # soft CPU limit sends SIGXCPU (reported as a timeout); the hard one, a second later, SIGKILL
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, limits.file_mb << 20, limits.file_mb << 20),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if limits.memory_mb is not None:
        wanted.append((resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20))
    # Never ask for more than the current hard limit: an unprivileged parent may not raise it.
    settings = [(res, _capped(soft, res), _capped(hard, res)) for res, soft, hard in wanted]

    def apply():
        for res, soft, hard in settings:
            resource.setrlimit(res, (soft, hard))

    return apply


def _capped(value: int, res: int) -> int:
    hard = resource.getrlimit(res)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _process_limit(uid: int, headroom: int) -> int:
    """RLIMIT_NPROC for a child of `uid`: its current task count plus headroom.

    The kernel compares the limit with ALL tasks (threads included) of the
    real uid, so a bare `headroom` would already be exhausted for a busy user.
    Root is exempt from the check, so counting is skipped there.
    """
    if uid == 0:
        return headroom
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(os.path.join(entry.path, "task")))
            except OSError:  # the process ended while we looked
                pass
    return count + headroom


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Whether `pid` exited within timeout_s; it is left a zombie (not reaped)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # kernels before 5.3: poll with WNOWAIT instead
        return _poll_unreaped(pid, timeout_s)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(fd)


def _poll_unreaped(pid: int, timeout_s: float) -> bool:
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        return f.read(4 * chars).decode("utf-8", errors="replace")[:chars]


def _read_tail(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def require_executable(name: str, install_hint: str) -> str:
    """The absolute path of `name` on PATH, or FileNotFoundError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"executable {name!r} not found on PATH; install it ({install_hint})")
    return path
