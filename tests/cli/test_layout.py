"""The project's shape: engine flags written once, imports that run downhill, a light CLI."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys

from tokenmill.engine_args import EngineArgs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_engine_flags_table_is_the_generated_one():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start, end = "<!-- engine-flags:start -->\n", "<!-- engine-flags:end -->"
    assert start in readme and end in readme, "the README lost its engine-flags markers"
    table = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert table == EngineArgs.markdown_table(), (
        "README's engine flags differ from EngineArgs; paste EngineArgs.markdown_table()")


def test_every_engine_field_round_trips_through_the_command_line():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    defaults = EngineArgs.from_cli_args(parser.parse_args([]))
    assert defaults == EngineArgs()
    given = EngineArgs.from_cli_args(parser.parse_args([
        "--model", "m.gguf", "--dtype", "bfloat16", "--max-num-seqs", "7",
        "--no-chunked-prefill", "--no-prefix-caching", "--max-model-len", "64"]))
    assert given == EngineArgs(model="m.gguf", dtype="bfloat16", max_num_seqs=7,
                               enable_chunked_prefill=False, enable_prefix_caching=False,
                               max_model_len=64)
    cli_fields = {f.name for f in dataclasses.fields(EngineArgs) if f.metadata["on_cli"]}
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == cli_fields


def test_cli_help_imports_no_torch():
    code = ("import sys; from tokenmill.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'tokenizers', 'jinja2', 'gguf', 'fastapi') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"tokenmill --help imports {out.stdout.strip()}"


def test_import_layers_contract_holds():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert exe is not None, "import-linter (a test dependency) is not installed"
    out = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_every_command_prints_its_help():
    """argparse %-formats help strings: a help text with a bare % (say "50% of")
    crashes ``--help`` of every command that takes the engine flags."""
    from tokenmill.cli import build_parser

    parser = build_parser()
    commands = [[], ["generate"], ["chat"], ["serve"], ["bench"], ["bench", "serve"],
                ["bench", "throughput"], ["bench", "latency"]]
    for argv in commands:
        try:
            parser.parse_args([*argv, "--help"])
        except SystemExit as e:
            assert e.code == 0, argv
