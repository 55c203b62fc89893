"""The command line builds the spec-section flags of the command being run only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visgen.cli import SPECLESS_COMMANDS, build_parser, command_of


@pytest.mark.parametrize("argv, command", [
    (["data", "pack", "SRC", "--out", "O"], ("data", "pack")),
    (["-v", "train", "lm", "--steps", "3"], ("train", "lm")),
    (["generate", "a red circle", "--out", "x.png"], ("generate",)),
    (["--help"], ()),
    (["data"], ()),
    (["nonsense", "words"], ()),
])
def test_command_of_names_the_command_in_argv(argv, command):
    assert command_of(argv) == command


def test_help_and_a_specless_command_do_not_import_the_components():
    # serve and retrain take flags from sections whose modules need neither (their classes are looked
    # up by module, not through visgen.config, which imports every component).
    code = ("import sys\nfrom visgen.cli import main\n"
            "for argv in (['--help'], ['data', 'pack', '--help'], ['serve', '--help'], ['retrain', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'ray.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED []", out.stdout[-500:]


def test_only_the_chosen_command_gets_section_flags_and_specless_ones_take_no_spec():
    args = build_parser(only=("data", "synth")).parse_args(["data", "synth", "--num-shards", "3"])
    assert vars(args)["cfg:data.synth.num_shards"] == 3
    with pytest.raises(SystemExit):  # another command's section flags are not built
        build_parser(only=("data", "synth")).parse_args(["data", "ingest", "--resolution", "64"])
    assert build_parser().parse_args(["data", "ingest", "--resolution", "64"]) is not None
    assert ("data", "pack") in SPECLESS_COMMANDS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "pack", "SRC", "--out", "O", "--pipeline", "x.yaml"])
