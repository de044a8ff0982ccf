"""Small helpers shared by tests: run the CLI in-process and capture its one-line errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quantkit.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys, *args) -> CliResult:
    """Run `quantkit ARGS` in this process and return its exit code and output."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, a single `error:` line, no traceback, naming what it should."""
    assert result.code == 2, result
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create entries in (root ignores mode bits, so use /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/self").resolve()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def leftovers(parent: Path, name: str) -> list[Path]:
    """Anything named like an output or its temporary sibling."""
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
