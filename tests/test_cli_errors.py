"""A user's mistake is one line `error: ...` and the exit status 2, not a traceback (issue
22, item 8); internal errors keep their traceback; no start-up notices from transformers
or libtpu. The commands run as subprocesses, as a user starts them; each fails on its
input before compiling anything."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metamorph_jax import input_errors, platforms

REPO = Path(__file__).resolve().parents[1]

# The shared test environment has torch (for the parity tests); a user's install from
# requirements.txt does not, and there transformers prints its notice at import. A None in
# sys.modules is how Python marks a module absent: find_spec("torch") returns None, as
# transformers' check does without torch installed.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "target, sys.argv = sys.argv[1], sys.argv[1:]; "
    "runpy.run_module(target[3:], run_name='__main__', alter_sys=True) "
    "if target.startswith('-m:') else runpy.run_path(target, run_name='__main__')")


def start(target: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python SCRIPT args` (target a path under REPO) or `python -m MODULE args`
    (target "-m:MODULE"), without torch and with the user's environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    target = target if target.startswith("-m:") else str(REPO / target)
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, target, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "PyTorch was not found" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "no_answer.tsv").write_text("index\tquestion\tA\tB\n1\twhat?\tx\ty\n")
    (root / "records.jsonl").write_text('{"conversations": []}\n')
    (root / "predictions").mkdir()
    return root


MISSING = "/nonexistent/metamorph_cli_test"
CASES = {
    # name: (target, args (FILES is the fixture's folder), words the error line names)
    "train: mistyped override": (
        "train.py", ["--config", "configs/tiny.py", "--config.stages.instruct.stepz=3"],
        ['error: --config.stages.instruct.stepz: no such field; did you mean "steps"?']),
    "train: missing config file": (
        "train.py", ["--config", f"{MISSING}.py"], [f"--config {MISSING}.py: no such file"]),
    "train: unknown flag": (
        "train.py", ["--config", "configs/tiny.py", "--stepz", "3"], ["stepz"]),
    "generate: missing checkpoint": (
        "generate.py", ["--checkpoint", MISSING, "--prompt", "hi"],
        [f"--checkpoint {MISSING} is not a folder"]),
    "generate: unknown flag": (
        "generate.py", ["--checkpoint", MISSING, "--promt", "hi"],
        ["unrecognized arguments: --promt"]),
    "eval: benchmark file missing": (
        "eval.py", ["--predictions", "FILES/predictions", "--benchmarks",
                    "mmbench=FILES/absent.tsv"], ["absent.tsv: file does not exist"]),
    "eval: benchmark file lacks a column": (
        "eval.py", ["--predictions", "FILES/predictions", "--benchmarks",
                    "mmbench=FILES/no_answer.tsv"],
        ["no_answer.tsv", "field 'answer'", "lacks column"]),
    "eval: missing model folder (imports transformers)": (
        "eval.py", ["--llm", MISSING, "--data", "FILES/records.jsonl"],
        [f"tokenizer folder {MISSING} does not exist"]),
    "score_cli: benchmark file lacks a column": (
        "-m:metamorph_jax.evaluation.score_cli",
        ["--bench", "mmbench=FILES/no_answer.tsv", "--predictions", "FILES/predictions",
         "--out", "FILES/out"], ["no_answer.tsv", "field 'answer'"]),
    "encode: missing tower folder": (
        "-m:metamorph_jax.data.encode",
        ["--checkpoint", MISSING, "--input", "FILES/records.jsonl", "--output",
         "FILES/tokens.array_record"], [f"{MISSING} is not a converted model folder"]),
    "convert: missing source folder": (
        "-m:convert", ["to-flax", "llama", MISSING, "FILES/flax"],
        [f"{MISSING}/config.json: config file not found"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(case, files):
    target, args, words = CASES[case]
    args = [a.replace("FILES", str(files)) for a in args]
    last = assert_one_line_error(start(target, *args, cwd=REPO), *words)
    if case == "train: mistyped override":
        assert last == words[0]   # no quotes or escapes of ml_collections' KeyError


def test_debug_keeps_the_traceback(files):
    done = start("generate.py", "--checkpoint", MISSING, "--prompt", "hi", "--debug", cwd=REPO)
    assert done.returncode == 1 and "Traceback" in done.stderr
    assert f"FileNotFoundError: --checkpoint {MISSING} is not a folder" in done.stderr


def test_benchmarks_start_on_the_cpu_without_libtpu_noise():
    """`python -m benchmarks.NAME` imports the package first: with libtpu installed and no
    accelerator, JAX is asked for the CPU before it is imported (platforms.py), as the
    commands do, instead of printing libtpu's initialisation errors."""
    pytest.importorskip("libtpu", reason="the start-up noise comes from an installed libtpu")
    if platforms.has_accelerator():
        pytest.skip("an accelerator is attached: JAX chooses it")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import os, sys, benchmarks; "
            "print(os.environ.get('JAX_PLATFORMS'), 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["cpu", "False"], done.stderr[-2000:]


# --- run_command's classification, in-process ----------------------------------------------

def run(main, capsys, *argv):
    code = input_errors.run_command(main, list(argv))
    return code, capsys.readouterr().err


def test_input_errors_are_one_line(capsys):
    def missing_file(argv):
        open("/nonexistent/metamorph_cli_test.json")

    def two_line_message(argv):
        raise input_errors.BadInput("records.jsonl:3: field 'image'\nis not a path")

    def unknown_key(argv):
        from metamorph_jax import architectures
        architectures.get("llama-9000")

    assert run(missing_file, capsys) == (
        2, "error: /nonexistent/metamorph_cli_test.json: No such file or directory\n")
    assert run(two_line_message, capsys) == (
        2, "error: records.jsonl:3: field 'image' is not a path\n")
    code, err = run(unknown_key, capsys)
    assert code == 2 and err.startswith("error: unknown architecture 'llama-9000'"), err


def test_a_bug_keeps_its_traceback(capsys):
    def bug(argv):
        raise ValueError("an internal shape mismatch")   # not an input error

    with pytest.raises(ValueError, match="internal shape"):
        input_errors.run_command(bug, [])
    assert capsys.readouterr().err == ""


def test_debug_reraises_input_errors():
    def missing(argv):
        raise input_errors.BadInput("--checkpoint x is not a folder")

    with pytest.raises(input_errors.BadInput):
        input_errors.run_command(missing, ["--checkpoint", "x", "--debug"])


def test_the_library_errors_are_input_errors():
    """The named errors of bad files, fields and flags derive from InputError (and stay
    ValueErrors, which callers catch)."""
    from convert.core import ConversionError
    from convert.safetensors_io import SafetensorsError
    from metamorph_jax import config_io, distributed
    from metamorph_jax.data.conversation import RecordError
    from metamorph_jax.data.token_store import TokenStoreError
    from metamorph_jax.evaluation.samples import BenchmarkFileError
    from metamorph_jax.inference.token_encoder import EncodeError
    from metamorph_jax.training.objectives import StageConfigError
    from metamorph_jax.training.plan import PlanError
    for error in (ConversionError, SafetensorsError, config_io.ConfigFileError,
                  distributed.DistributedConfigError, RecordError, TokenStoreError,
                  BenchmarkFileError, EncodeError, StageConfigError, PlanError):
        assert issubclass(error, input_errors.InputError) and issubclass(error, ValueError), error


def test_unknown_override_message():
    error = AttributeError(KeyError('\'stepz\'\nDid you mean "steps" instead of "stepz"?'))
    argv = ["train.py", "--config", "c.py", "--config.stages.instruct.stepz=3"]
    assert input_errors.unknown_override(error, argv) == (
        '--config.stages.instruct.stepz: no such field; did you mean "steps"?')
    assert input_errors.unknown_override(KeyError("'nope'"), ["train.py"]) == (
        "a --config.* override (field 'nope'): no such field")


@pytest.mark.parametrize("body, message", [
    ('    raise ValueError("field x must be positive")\n', "ValueError: field x must be positive"),
    ("    return undefined_name\n", "NameError: name 'undefined_name' is not defined"),
    ('    return {}["stages"]\n', "KeyError: 'stages'"),
])
def test_a_failing_config_file_is_named_with_its_line(tmp_path, body, message):
    """The config file's own code failing is the user's to fix: one line naming the file
    and the line (ml_collections hands a ValueError's traceback over as text), not
    mistaken for an unknown override."""
    from absl import flags

    from metamorph_jax.training import runner
    path = tmp_path / "config.py"
    path.write_text("def get_config():\n" + body)
    with pytest.raises(flags.Error) as raised:
        runner.parse_command(["train.py", "--config", str(path)])
    assert str(raised.value) == f"--config {path}, line 2: {message}"
