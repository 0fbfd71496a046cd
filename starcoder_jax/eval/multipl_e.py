"""MultiPL-E (Cassano et al. 2022): HumanEval translated to other languages, run with local toolchains.

A problem is a JSONL record with name (or task_id), prompt, tests and
stop_tokens. The program is prompt + completion (cut at the problem's stop
tokens) + "\\n" + tests, as BigCode's harness builds it; it is compiled when
the language needs it and run, and passes if everything exits 0. C++ and Rust
tests open with the "}" that closes the function whose body the stop token
"\\n}" cut off; Java's tests close the method and hold `main` of `class Problem`.

Commands follow MultiPL-E's evaluators: `g++ -std=c++17`, `javac -encoding
UTF8` then `java -ea` (asserts are off without -ea!), `node`, `lua`, `rustc`
(default edition, as MultiPL-E). Java problems import org.javatuples.*: give
the javatuples jar with `java_classpath`; without it the import line is
dropped, and the few problems that use Pair/Triplet fail to compile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from starcoder_jax.eval import common, sandbox

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 15.0      # running the built program
BUILD_TIMEOUT_S = 60.0        # compilers are slow on bits/stdc++.h and generics
EXTRA_STOPS = ("<|endoftext|>", "<file_sep>")  # BigCode adds these to the dataset's stop tokens
_JAVATUPLES_IMPORT = "import org.javatuples.*;"
# Heap and code-cache bounds keep the JVM's reservations under RLIMIT_AS;
# C1 only and the serial collector start faster and use fewer threads.
_JVM_FLAGS = ("-Xmx1g", "-XX:ReservedCodeCacheSize=64m", "-XX:CompressedClassSpaceSize=64m",
              "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


@dataclasses.dataclass(frozen=True)
class Language:
    """How one MultiPL-E language is built and run."""

    name: str
    source: str                      # file name the program is written to
    executables: tuple[str, ...]     # alternatives: the first found on PATH is used
    install_hint: str
    compiled: bool


LANGUAGES = {
    "cpp": Language("cpp", "program.cpp", ("g++",), "e.g. `apt-get install g++`", True),
    "java": Language("java", "Problem.java", ("javac",), "e.g. `apt-get install default-jdk`", True),
    "js": Language("js", "program.js", ("node",), "e.g. `apt-get install nodejs`", False),
    "lua": Language("lua", "program.lua", ("lua", "lua5.4", "lua5.3"),
                    "e.g. `apt-get install lua5.3 lua-unit`; the tests need luaunit", False),
    "rs": Language("rs", "program.rs", ("rustc",), "e.g. `curl https://sh.rustup.rs -sSf | sh` or "
                   "`apt-get install rustc`", True),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...]
    language: str | None = None

    @property
    def generation_prompt(self) -> str:
        return self.prompt.strip()

    @property
    def stops(self) -> tuple[str, ...]:
        return self.stop_tokens + EXTRA_STOPS


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Absolute paths of a language's tools on this machine (see `resolve_toolchain`)."""

    language: Language
    tools: Mapping[str, str]
    java_classpath: str | None = None


def load_problems(path: str | os.PathLike, *, language: str | None = None,
                  limit: int | None = None) -> list[Problem]:
    """Problems of a MultiPL-E JSONL file; records naming another language than `language` are an error."""
    path = os.fspath(path)
    problems = []
    for number, row in enumerate(common.read_jsonl(path), 1):
        where = f"{path} record {number}"
        if "name" not in row and "task_id" not in row:
            raise ValueError(f"{where}: needs 'name' or 'task_id', got fields {', '.join(sorted(row))}")
        if "tests" not in row and "test" in row:
            row = {**row, "tests": row["test"]}
        common.require_fields(row, ("prompt", "tests", "stop_tokens"), where)
        if language is not None and row.get("language", language) != language:
            raise ValueError(f"{where}: language {row['language']!r}, but --language is {language!r}")
        problems.append(Problem(row.get("name", row.get("task_id")), row["prompt"], row["tests"],
                                tuple(row["stop_tokens"]), row.get("language")))
    return problems[:limit] if limit is not None else problems


def resolve_toolchain(language: str, *, java_classpath: str | None = None) -> Toolchain:
    """The tools `language` needs, or FileNotFoundError naming the executable and how to install it."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    spec = LANGUAGES[language]
    found = next((path for path in map(shutil.which, spec.executables) if path), None)
    if found is None:
        raise FileNotFoundError(f"MultiPL-E {language}: executable {spec.executables[0]!r} not found on "
                                f"PATH; install it ({spec.install_hint})")
    tools = {"main": found}
    if language == "java":
        tools["java"] = sandbox.require_executable("java", spec.install_hint)
    if language == "rs":
        tools["main"] = _real_rustc(found)
    if language == "lua":
        _require_luaunit(found, spec.install_hint)
    if java_classpath is not None and language != "java":
        raise ValueError(f"java_classpath is only for --language java, got language {language!r}")
    return Toolchain(spec, tools, java_classpath)


def _real_rustc(proxy: str) -> str:
    """rustup's `rustc` is a proxy that finds its toolchain through $HOME, which the sandbox
    replaces; the toolchain's own binary needs no HOME."""
    try:
        sysroot = subprocess.run([proxy, "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        raise FileNotFoundError(f"{proxy} --print sysroot failed ({error}); is a Rust toolchain "
                                "installed (`rustup default stable`)?") from None
    real = os.path.join(sysroot, "bin", "rustc")
    return real if os.access(real, os.X_OK) else proxy


def _require_luaunit(lua: str, install_hint: str) -> None:
    probe = subprocess.run([lua, "-e", "require('luaunit')"], capture_output=True, text=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        raise FileNotFoundError(f"MultiPL-E lua: {lua} cannot load the 'luaunit' module the tests use; "
                                f"install it ({install_hint}, or `luarocks install luaunit`)")


def program_source(prompt: str, completion: str, problem: Problem, toolchain: Toolchain) -> str:
    source = f"{prompt}{completion}\n{problem.tests}"
    if toolchain.language.name == "java" and not toolchain.java_classpath:
        # Without the jar, javac rejects the import itself even where no tuple is used.
        source = source.replace(_JAVATUPLES_IMPORT, "", 1)
    return source


def steps(toolchain: Toolchain, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[sandbox.Step, ...]:
    """Build (if any) and run steps for the language's source file in the sandbox directory."""
    # Compilers and the JVM spawn processes and threads: more headroom than a Python test needs.
    build = sandbox.Limits(timeout_s=BUILD_TIMEOUT_S, memory_mb=4096, processes=256)
    run = sandbox.Limits(timeout_s=timeout_s, memory_mb=4096, processes=256)
    name, main, source = toolchain.language.name, toolchain.tools["main"], toolchain.language.source
    if name == "cpp":
        return (sandbox.Step((main, "-std=c++17", "-o", "program", source), build, build=True),
                sandbox.Step(("./program",), run))
    if name == "rs":
        return (sandbox.Step((main, source, "-o", "program"), build, build=True),
                sandbox.Step(("./program",), run))
    if name == "java":
        classpath = os.pathsep.join(filter(None, (".", toolchain.java_classpath)))
        javac_flags = tuple(f"-J{flag}" for flag in _JVM_FLAGS)
        return (sandbox.Step((main, *javac_flags, "-encoding", "UTF8", "-cp", classpath, source), build,
                             build=True),
                sandbox.Step((toolchain.tools["java"], *_JVM_FLAGS, "-ea", "-cp", classpath, "Problem"), run))
    return (sandbox.Step((main, source), run),)  # js, lua: interpreted


def make_jobs(problems: Sequence[Problem], samples: Mapping[str, Sequence[Mapping]], toolchain: Toolchain,
              *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[common.Job]:
    """One sandboxed job per sample; samples: task_id -> records with "completion" (and optional "prompt",
    the exact text it continues; default: the problem's prompt as given in the data)."""
    if toolchain.language.name == "java" and not toolchain.java_classpath:
        log.warning("java: no javatuples jar given (--java-classpath); `%s` is dropped and the problems "
                    "that use Pair/Triplet/... will not compile", _JAVATUPLES_IMPORT)
    run_steps = steps(toolchain, timeout_s=timeout_s)
    jobs = []
    for problem in problems:
        for record in samples.get(problem.task_id, ()):
            prompt = record.get("prompt", problem.prompt)
            completion = common.truncate_at_stops(record["completion"], problem.stops)
            source = program_source(prompt, completion, problem, toolchain)
            program = sandbox.Program({toolchain.language.source: source}, run_steps)
            extra = {"prompt": prompt} if "prompt" in record else {}
            jobs.append(common.Job(problem.task_id, completion, program, extra))
    return jobs
