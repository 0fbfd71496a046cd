"""The model flags every subcommand shares (cli.common.add_model_args), the one loader behind
them (cli.common.load_model), and `generate` with several prompts running as one batch."""

import gzip
import json

import pytest

from starcoder_jax.cli import common
from starcoder_jax.cli.main import build_parser, main
from starcoder_jax.config import ATTENTION_IMPLS, MATMUL_IMPLS
from starcoder_jax.inference import generate as gen_mod

PROBLEM = {"task_id": "Toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(c):\n    assert c(1, 2) == 3\n", "canonical_solution": "    return a + b\n"}


class Loaded(Exception):
    """Raised by the spy loader: the command got as far as loading its model."""


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "toy.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    infill = tmp_path / "infill.jsonl"
    infill.write_text(json.dumps({**PROBLEM, "prompt": "def add(a, b):\n    return ", "suffix": "\n",
                                  "canonical_solution": "a + b"}) + "\n")
    return str(path), str(infill)


COMMANDS = {
    "generate": lambda p: ["generate", "x = 1"],
    "infill": lambda p: ["infill", "--prefix", "a", "--suffix", "b"],
    "eval humaneval": lambda p: ["eval", "humaneval", "--data", p[0], "--n", "1", "--out", p[0] + ".out"],
    "eval infilling": lambda p: ["eval", "infilling", "--data", p[1], "--n", "1", "--out", p[1] + ".out"],
    "eval heldout": lambda p: ["eval", "heldout"],
    "bench": lambda p: ["bench", "--model", "pystdlib-9m"],
    "bench --train": lambda p: ["bench", "--train", "--model", "pystdlib-9m"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_loads_through_the_one_loader(command, problems, monkeypatch):
    seen = []

    def spy(args, *, name=None, **overrides):
        seen.append((name or common.model_name(args.model), args.attention_impl, args.matmul_impl, overrides))
        raise Loaded

    monkeypatch.setattr(common, "load_model", spy)
    monkeypatch.setattr("starcoder_jax.cli.eval._LOADED", {})
    argv = [*COMMANDS[command](problems), "--attention-impl", "cpu_blocked", "--matmul-impl", "xla"]
    with pytest.raises(Loaded):
        main(argv)
    assert len(seen) == 1
    name, attention, matmul, _ = seen[0]
    assert name.endswith("pystdlib-9m") and (attention, matmul) == ("cpu_blocked", "xla")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_passes_its_adapter_to_load_pretrained(command, problems, monkeypatch):
    seen = []

    def spy(path, **kwargs):
        seen.append(kwargs["adapter"])
        raise Loaded

    monkeypatch.setattr("starcoder_jax.model.pretrained.load_pretrained", spy)
    monkeypatch.setattr("starcoder_jax.cli.eval._LOADED", {})
    with pytest.raises(Loaded):
        main([*COMMANDS[command](problems), "--adapter", "adapters/python"])
    assert seen == ["adapters/python"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kernel_flags_default_to_auto_and_refuse_unknown_names(command, problems, capsys):
    argv = COMMANDS[command](problems)
    args = build_parser().parse_args(argv)
    assert (args.attention_impl, args.matmul_impl) == ("auto", "auto")
    for flag, names in (("--attention-impl", ATTENTION_IMPLS), ("--matmul-impl", MATMUL_IMPLS)):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*argv, flag, "flash"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: 'flash'" in err and all(repr(n) in err for n in names)


def test_attention_impl_reaches_the_model(tiny_model_dir, monkeypatch, capsys):
    configs = []
    real = gen_mod.generate

    def recording(model, prompts, **kwargs):
        configs.append(model.config)
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(gen_mod, "generate", recording)
    argv = ["generate", "--model", tiny_model_dir, "--max-new-tokens", "4", "--json", "def f():"]
    assert main([*argv, "--attention-impl", "xla", "--matmul-impl", "xla"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    auto = json.loads(capsys.readouterr().out)
    assert [(c.attention_impl, c.matmul_impl) for c in configs] == [("xla", "xla"), ("auto", "auto")]
    assert forced["ids"] == auto["ids"]  # the forms compute the same model


@pytest.mark.slow
def test_generate_runs_several_prompts_as_one_batch(tiny_model_dir, monkeypatch, capsys):
    prefills = []
    real = gen_mod.prefill

    def counted(*args, **kwargs):
        prefills.append(args[2].shape)  # ids [B, T]
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "prefill", counted)
    prompts = ["def add(a, b):", "import os", "x = [1, 2"]
    argv = ["generate", "--model", tiny_model_dir, "--max-new-tokens", "5"]
    assert main([*argv, "--json", *prompts]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*argv, *prompts]) == 0
    printed = capsys.readouterr().out
    assert [shape[0] for shape in prefills] == [4, 4]  # one batch per command (3 rows padded to 4)
    assert printed == "".join(f"--- prompt {i + 1} ---\n{r['prompt']}{r['text']}\n" for i, r in enumerate(records))
    assert [r["prompt"] for r in records] == prompts


def test_one_prompt_still_streams(tiny_model_dir, monkeypatch, capsys):
    events = []
    real = gen_mod.generate

    def recording(model, prompts, **kwargs):
        events.append(kwargs.get("on_event"))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(gen_mod, "generate", recording)
    assert main(["generate", "--model", tiny_model_dir, "--max-new-tokens", "5", "x = 1"]) == 0
    assert len(events) == 1 and events[0] is not None
    assert capsys.readouterr().out.startswith("x = 1")


def test_help_of_every_command(capsys):
    parser = build_parser()
    commands = ["convert", "generate", "finetune", "train-tokenizer", "shard-plan", "infill", "bench",
                "eval", "eval humaneval", "eval multipl-e", "eval infilling", "eval heldout"]
    for argv in ([], *(c.split() for c in commands)):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage: starcoder-jax" in capsys.readouterr().out
