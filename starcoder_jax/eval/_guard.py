"""The prelude a sandboxed Python program runs under: destructive calls refused.

`sandbox.python_program` ships this file's source to the child interpreter and
calls `install(os.getcwd())` before the program. It catches the accidents a
code model makes (deleting files, spawning shells, forking); it is NOT a
security boundary: ctypes, or any C extension, reaches the raw system calls.
The boundary is the OS side of `sandbox.py` (limits, process group, fresh
directory, an unprivileged user where one is given).

This module must stay self-contained (standard library only, no package
imports): it runs as plain source text inside the child.
"""

import builtins
import io
import os
import shutil
import subprocess

# Anything that starts, replaces or signals a process, or leaves the process group
# (which is what the parent kills on timeout).
_PROCESS_CALLS = (
    "system", "popen", "fork", "forkpty", "kill", "killpg",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "setuid", "setgid", "setsid", "setpgid",
)
# Calls that change the file system: allowed only on paths inside the sandbox directory.
_PATH_CALLS = (
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
    "truncate", "chmod", "chown", "lchown", "link", "symlink", "mkdir", "makedirs",
    "mkfifo", "mknod", "utime",
)
_SUBPROCESS_CALLS = ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                     "getstatusoutput")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install(root):
    """Replaces destructive functions of os / shutil / subprocess / builtins.

    root: the sandbox directory; file-changing calls on paths outside it (after
    resolving symlinks and `..`) raise PermissionError, as do all
    process-starting calls.
    """
    root = os.path.realpath(root)

    def inside(path):
        if isinstance(path, int):  # a file descriptor: already opened, so already checked
            return True
        full = os.path.realpath(os.fsdecode(os.fspath(path)))
        return full == root or full.startswith(root + os.sep)

    def refused(name):
        def call(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return call

    def confined(name, function):
        # Every path-like positional argument must lie inside root (rename has two).
        def call(*args, **kwargs):
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {name}({arg!r}) outside {root}")
            return function(*args, **kwargs)
        return call

    for name in _PROCESS_CALLS:
        if hasattr(os, name):
            setattr(os, name, refused(f"os.{name}"))
    for name in _PATH_CALLS:
        if hasattr(os, name):
            setattr(os, name, confined(f"os.{name}", getattr(os, name)))
    for name in _SUBPROCESS_CALLS:
        setattr(subprocess, name, refused(f"subprocess.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refused(f"shutil.{name}"))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: open({file!r}, {mode!r}) outside {root}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and not inside(path):
            raise PermissionError(f"sandbox: os.open({path!r}) for writing outside {root}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
