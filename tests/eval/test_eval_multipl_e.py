"""MultiPL-E scoring with the local toolchains, on small problems in MultiPL-E's own layout.

The layout follows the real data (nuprl/MultiPL-E humaneval-*): the prompt ends
with the function's opening line; C++ / Rust tests start with the "}" that the
stop token "\\n}" cut; Java tests close the method and hold `main` of `class
Problem`, and the header imports org.javatuples like every MultiPL-E Java problem.
"""

import dataclasses
import json

import pytest

from starcoder_jax.cli.eval import main
from starcoder_jax.eval import multipl_e

JAVA_HEADER = """\
import java.util.*;
import java.lang.reflect.*;
import org.javatuples.*;
import java.security.*;
import java.math.*;
import java.io.*;
import java.util.stream.*;
class Problem {
"""
CPP_HEADER = "#include<assert.h>\n#include<bits/stdc++.h>\n"
JS_TEST_HEAD = "const assert = require('node:assert');\n\n\nfunction test() {\n"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    tests: str
    good: str    # a completion that solves it
    wrong: str   # one that compiles and runs, and fails the tests


# language -> (stop tokens, cases)
CASES = {
    "cpp": (["\n}"], [
        Case("T_add", CPP_HEADER + "// Sum of x and y\nlong add(long x, long y) {\n",
             """}
int main() {
    auto candidate = add;
    assert(candidate((2), (3)) == (5));
    assert(candidate((-4), (4)) == (0));
}
""", "    return x + y;\n", "    return x - y;\n"),
        Case("T_count_upper", CPP_HEADER + "// Upper-case letters in s\nlong count_upper(std::string s) {\n",
             """}
int main() {
    auto candidate = count_upper;
    assert(candidate(("aBcD")) == (2));
    assert(candidate(("")) == (0));
}
""", """    long n = 0;
    for (char c : s) n += std::isupper(static_cast<unsigned char>(c)) ? 1 : 0;
    return n;
""", "    return s.size();\n"),
    ]),
    "java": (["\n    }\n"], [
        Case("T_add", JAVA_HEADER + "    // Sum of x and y\n    public static long add(long x, long y) {\n",
             """    }
    public static void main(String[] args) {
    assert(add((2l), (3l)) == (5l));
    assert(add((-4l), (4l)) == (0l));
    }

}
""", "        return x + y;\n", "        return x - y;\n"),
        Case("T_reverse", JAVA_HEADER + "    // The list reversed\n"
             "    public static ArrayList<Long> reverse(ArrayList<Long> xs) {\n",
             """    }
    public static void main(String[] args) {
    assert(reverse((new ArrayList<Long>(Arrays.asList((long)1l, (long)2l))))\
.equals((new ArrayList<Long>(Arrays.asList((long)2l, (long)1l)))));
    }

}
""", """        ArrayList<Long> out = new ArrayList<>(xs);
        Collections.reverse(out);
        return out;
""", "        return xs;\n"),
    ]),
    "js": (["\nfunction ", "\n/*", "\n//", "\nconsole.log"], [
        Case("T_add", "//Sum of x and y\nfunction add(x, y){\n",
             JS_TEST_HEAD + """  let candidate = add;
  assert.deepEqual(candidate(2, 3),5);
  assert.deepEqual(candidate(-4, 4),0);
}

test();""", "  return x + y;\n}\n", "  return x - y;\n}\n"),
        Case("T_evens", "//The even numbers of xs\nfunction evens(xs){\n",
             JS_TEST_HEAD + """  let candidate = evens;
  assert.deepEqual(candidate([1, 2, 3, 4]),[2, 4]);
  assert.deepEqual(candidate([]),[]);
}

test();""", "  return xs.filter((x) => x % 2 === 0);\n}\n", "  return xs;\n}\n"),
    ]),
    "rs": (["\n}"], [
        Case("T_add", "/// Sum of x and y\nfn add(x: isize, y: isize) -> isize {\n",
             """}

fn main() {
    let candidate = add;
    assert_eq!(candidate(2, 3), 5);
    assert_eq!(candidate(-4, 4), 0);
}
""", "    x + y\n", "    x - y\n"),
    ]),
    "lua": (["\nlocal", "\nfunction", "\n--", "\n\n"], [
        Case("T_add", "-- Sum of x and y\nlocal function add(x, y)\n",
             """lu = require('luaunit')

function test_humaneval()
local candidate = add
    lu.assertEquals(candidate(2, 3), 5)
end

os.exit(lu.LuaUnit.run())""", "    return x + y\nend\n", "    return x - y\nend\n"),
    ]),
}


def toolchain_or_skip(language):
    try:
        return multipl_e.resolve_toolchain(language)
    except FileNotFoundError as error:
        pytest.skip(f"{language} toolchain missing on this machine: {error}")


def write_data(tmp_path, language):
    stops, cases = CASES[language]
    path = tmp_path / f"humaneval-{language}.jsonl"
    path.write_text("".join(json.dumps({"name": c.name, "language": language, "prompt": c.prompt,
                                        "tests": c.tests, "stop_tokens": stops}) + "\n" for c in cases))
    return str(path)


def score(tmp_path, language, samples):
    data = write_data(tmp_path, language)
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    out = tmp_path / "out"
    assert main(["multipl-e", "--language", language, "--data", data, "--samples", str(samples_path),
                 "--out", str(out), "--workers", "2"]) == 0
    with open(out / "samples.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("language", ["cpp", "java", "js", "rs", "lua"])
def test_good_completions_pass_and_wrong_ones_fail(tmp_path, language):
    toolchain_or_skip(language)
    _, cases = CASES[language]
    rows = score(tmp_path, language, [(c.name, c.good) for c in cases] + [(c.name, c.wrong) for c in cases])
    verdicts = {(row["task_id"], row["completion"].strip()): row["status"] for row in rows}
    # Java's wrong answers fail only because asserts run (java -ea).
    assert verdicts == {**{(c.name, c.good.strip()): "passed" for c in cases},
                        **{(c.name, c.wrong.strip()): "failed" for c in cases}}, \
        [row["stderr"][-300:] for row in rows]


def test_completions_are_cut_at_the_problems_stop_tokens(tmp_path):
    toolchain_or_skip("cpp")
    # The model wrote its own main after the function: a second main unless cut at "\n}".
    rambling = "    return x + y;\n}\nint main() {\n    return 0;\n}\n"
    rows = score(tmp_path, "cpp", [("T_add", rambling)])
    assert rows[0]["status"] == "passed" and rows[0]["completion"] == "    return x + y;"


def test_a_compile_error_is_status_error(tmp_path):
    toolchain_or_skip("js")
    toolchain_or_skip("rs")
    rows = score(tmp_path, "rs", [("T_add", "    x + \"y\"\n")])
    assert rows[0]["status"] == "error" and "error" in rows[0]["stderr"]


def test_missing_toolchain_names_the_executable_and_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(multipl_e.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"'g\+\+' not found on PATH.*apt-get install g\+\+"):
        multipl_e.resolve_toolchain("cpp")
    with pytest.raises(FileNotFoundError, match="'node' not found.*apt-get install nodejs"):
        multipl_e.resolve_toolchain("js")
    assert main(["multipl-e", "--language", "java", "--data", write_data(tmp_path, "java")]) == 2
    assert "executable 'javac' not found" in capsys.readouterr().err


def test_java_needs_the_runtime_too(monkeypatch):
    monkeypatch.setattr(multipl_e.shutil, "which", lambda name: None if name == "java" else name)
    with pytest.raises(FileNotFoundError, match="'java' not found"):
        multipl_e.resolve_toolchain("java")


def test_data_checks(tmp_path):
    path = write_data(tmp_path, "js")
    assert [p.task_id for p in multipl_e.load_problems(path, language="js")] == ["T_add", "T_evens"]
    with pytest.raises(ValueError, match="language 'js', but --language is 'cpp'"):
        multipl_e.load_problems(path, language="cpp")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "tests": "y", "stop_tokens": []}) + "\n")
    with pytest.raises(ValueError, match="needs 'name' or 'task_id'"):
        multipl_e.load_problems(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="language must be one of"):
        multipl_e.resolve_toolchain("cobol")


def test_java_drops_the_javatuples_import_only_without_the_jar():
    problem = multipl_e.Problem("T", JAVA_HEADER + "    static long f() {\n", "    }\n}\n", ("\n    }\n",))
    spec = multipl_e.LANGUAGES["java"]
    without = multipl_e.Toolchain(spec, {"main": "javac", "java": "java"})
    with_jar = multipl_e.Toolchain(spec, {"main": "javac", "java": "java"},
                                   java_classpath="/opt/javatuples.jar")
    assert "org.javatuples" not in multipl_e.program_source(problem.prompt, "", problem, without)
    assert "import org.javatuples.*;" in multipl_e.program_source(problem.prompt, "", problem, with_jar)
    run_argv = multipl_e.steps(with_jar)[-1].argv
    assert "-ea" in run_argv and run_argv[run_argv.index("-cp") + 1] == ".:/opt/javatuples.jar"
