"""CLI: --help works everywhere and every generated flag reaches its spec field."""

import argparse
import subprocess
import sys

import pytest
from pydantic import BaseModel

from visgen.cli import COMMANDS, DERIVED_FIELDS, build_parser, overrides_from_args
from visgen.config import SpecError, get_dotted, load_spec

SPEC = "pipelines/shapes-tiny.yaml"
# Fields whose other values are only valid with another field set (the spec refuses them otherwise):
# the flags that set it, added to the command line when such a field's flag is checked.
PREREQUISITES = {"lm.model.grid_context_radius": ["--grid-context"]}


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _flags(parser):
    for action in parser._actions:
        if action.dest.startswith("cfg:"):
            yield action, action.dest[4:]


def _candidates(current):
    """Valid-looking values different from ``current``, most plausible first."""
    if isinstance(current, bool):
        return [not current]
    if isinstance(current, int):
        return [current + 1, current - 1, max(1, current // 2), 1, 2]
    if isinstance(current, float):
        return [round(current / 2, 6) if current else 0.5, round(current + 0.1, 6), 0.5, 0.0, 1.0]
    if isinstance(current, str):
        return [current + "-x", "x", False, True, 0.5]  # the last ones for "auto"-or-value fields
    if isinstance(current, (tuple, list)):
        if not current:  # an empty list says nothing of its items' type
            return [[2.0], [1], ["x"]]
        if all(isinstance(v, int) for v in current):
            return [[v + 1 for v in current], [1] * len(current), list(current[:-1])]
        if all(isinstance(v, float) for v in current):
            return [[round(v / 2, 6) for v in current], [round(v + 0.5, 6) for v in current]]
        if current and all(isinstance(v, str) for v in current):
            return [list(current[:-1]) or ["x"], list(current[1:]), list(reversed(current))]
    if isinstance(current, dict):
        return [{k: (v + 1 if isinstance(v, (int, float)) else v) for k, v in list(current.items())[:1]} | {}]
    if current is None:
        return ["x", 3, 0.5]
    return []


def _render(value) -> str:
    import yaml

    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _flag_check(command: tuple[str, ...], overrides=overrides_from_args) -> tuple[set[str], list[str]]:
    """Set each section flag of ``command`` to a valid value other than the spec's and read the spec back:
    (field paths whose flag reached them, problems). ``overrides`` turns parsed args into spec overrides."""
    parser = build_parser()
    sub = _subparser(parser, command)
    spec = load_spec(SPEC)
    reached, problems = set(), []
    for action, path in _flags(sub):
        current = get_dotted(spec, path)
        current = list(current) if isinstance(current, tuple) else current
        for cand in _candidates(current):
            if cand == current:
                continue
            if action.choices is not None:
                cand = next(c for c in action.choices if c != current)
            argv = [*command, "--pipeline", SPEC, action.option_strings[0]]
            if action.nargs == 0:  # --flag / --no-flag
                argv[-1] = action.option_strings[0] if cand else action.option_strings[1]
            else:
                argv.append(_render(cand))
            args = parser.parse_args(argv + PREREQUISITES.get(path, []))
            try:
                got = get_dotted(load_spec(SPEC, overrides(args)), path)
            except SpecError:
                continue  # not a valid value for this field: try the next candidate
            got = list(got) if isinstance(got, tuple) else got
            if got == cand:
                reached.add(path)
            else:
                problems.append(f"{action.option_strings[0]} {cand!r} set {path} to {got!r}")
            break
        else:
            problems.append(f"found no valid value to test {action.option_strings[0]} -> {path} (current {current!r})")
    return reached, problems


def _section_fields(section: str) -> set[str]:
    """Dotted paths of the plain fields of one spec section (nested sections have their own flags)."""
    obj = get_dotted(load_spec(SPEC), section)
    return {f"{section}.{name}" for name in type(obj).model_fields
            if not isinstance(getattr(obj, name), BaseModel) and name not in DERIVED_FIELDS.get(section, ())}


WITH_SECTIONS = [c for c in COMMANDS if COMMANDS[c][1]]


def test_section_classes_are_the_specs():
    """The CLI finds a section's class by module (without importing the whole spec): the same class
    the spec's tree has at that path, for every section a command takes flags from."""
    from visgen.cli import SECTION_CLASSES, section_class
    from visgen.config import SECTIONS

    used = {sec for _, sections, _ in COMMANDS.values() for sec in sections}
    assert used <= set(SECTION_CLASSES)
    assert {sec: section_class(sec) for sec in SECTION_CLASSES} == {sec: SECTIONS[sec] for sec in SECTION_CLASSES}


@pytest.mark.parametrize("command", WITH_SECTIONS, ids=[" ".join(c) for c in WITH_SECTIONS])
def test_every_flag_reaches_its_field(command):
    reached, problems = _flag_check(command)
    assert problems == []
    # One flag per field of each section the command declares, and each of them reached its field.
    expected = set().union(*(_section_fields(sec) for sec in COMMANDS[command][1]))
    assert expected and reached == expected, (sorted(expected - reached), sorted(reached - expected))


def test_commands_without_sections_have_no_section_flags():
    """The commands left out above: nothing of theirs goes unchecked."""
    parser = build_parser()
    for command in COMMANDS:
        if command not in WITH_SECTIONS:
            assert list(_flags(_subparser(parser, command))) == [], command


def test_the_flag_check_catches_a_flag_that_goes_nowhere_or_elsewhere():
    def dropped(args):  # --resolution parsed, then lost
        return {k: v for k, v in overrides_from_args(args).items() if k != "data.ingest.resolution"}

    def misrouted(args):  # --min-size lands on another field
        out = overrides_from_args(args)
        if "data.ingest.min_size" in out:
            out["data.ingest.max_text_tokens"] = out.pop("data.ingest.min_size")
        return out

    reached, problems = _flag_check(("data", "ingest"), dropped)
    assert "data.ingest.resolution" not in reached and any(p.startswith("--resolution ") for p in problems)
    reached, problems = _flag_check(("data", "ingest"), misrouted)
    assert "data.ingest.min_size" not in reached and any(p.startswith("--min-size ") for p in problems)


def test_set_reaches_any_field_and_workdir_flag(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["data", "ingest", "--pipeline", SPEC, "--set", "image_tokenizer.train.steps=7",
                              "--workdir", str(tmp_path)])
    spec = load_spec(SPEC, overrides_from_args(args))
    assert spec.image_tokenizer.train.steps == 7
    assert spec.workdir == str(tmp_path)


def test_literal_flags_list_their_choices():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "ingest", "--resize-mode", "stretch"])


# `python -m visgen.cli ARGV` for each command line below, each in a process of its own that has
# imported no visgen module: visgen.cli runs as __main__ (runpy, as `-m` does), with its own
# stdout, stderr and exit status. The processes are forked from one interpreter that imported
# only the third-party packages the component commands load (torch, Ray Data, ...: ~5 s per
# fresh interpreter on two cores, paid once here instead of once per command); every visgen
# import happens after the fork, in the order that command's own `python -m` would make it.
_FORK_RUNNER = r"""
import json, os, runpy, sys, tempfile, traceback
import numpy, pydantic, yaml, torch, ray.data, scipy.ndimage, PIL.Image, tokenizers, safetensors  # third-party only
assert not [m for m in sys.modules if m.split(".")[0] == "visgen"], "the runner must not import visgen"
results = []
for argv in json.load(sys.stdin):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["visgen.cli", *argv]
        code = 0
        try:
            runpy.run_module("visgen.cli", run_name="__main__", alter_sys=True)
        except SystemExit as done:  # as the interpreter turns it into an exit status
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    results.append({"argv": argv, "returncode": os.waitstatus_to_exitcode(status),
                    "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")})
print(json.dumps(results))
"""

HELP_ARGVS = [[], ["data"], ["spec"]] + [list(c) for c in COMMANDS]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """{argv tuple: CompletedProcess} of `python -m visgen.cli ARGV` for --help everywhere and `spec show`."""
    import json

    bad = tmp_path_factory.mktemp("cli") / "bad.yaml"
    bad.write_text(open(SPEC).read().replace("resolution: 32\n    min_size", "resolution: -3\n    min_size"))
    argvs = [[*argv, "--help"] for argv in HELP_ARGVS]
    argvs += [["spec", "show", "--pipeline", str(bad)], ["spec", "show", "--pipeline", SPEC, "--set", "data.synth.seed=5"]]
    done = subprocess.run([sys.executable, "-c", _FORK_RUNNER], input=json.dumps(argvs), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["argv"] for r in results] == argvs
    return {tuple(r["argv"]): subprocess.CompletedProcess(r["argv"], r["returncode"], r["stdout"], r["stderr"])
            for r in results} | {"bad": bad}


@pytest.mark.parametrize("argv", HELP_ARGVS)
def test_help_everywhere(argv, cli_runs):
    out = cli_runs[(*argv, "--help")]
    assert out.returncode == 0, out.stderr
    assert "usage: visgen" in out.stdout


def test_bad_spec_exits_2_with_the_field(cli_runs):
    out = cli_runs[("spec", "show", "--pipeline", str(cli_runs["bad"]))]
    assert out.returncode == 2
    assert "data.ingest.resolution: -3" in out.stderr


def test_spec_show_prints_resolved_json(cli_runs):
    out = cli_runs[("spec", "show", "--pipeline", SPEC, "--set", "data.synth.seed=5")]
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout)["data"]["synth"]["seed"] == 5
