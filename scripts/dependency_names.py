"""Dependency names and constraints for `make test-latest` / `make constraints`.

`make test-latest` must reach past pyproject's tested upper bounds to find drift on purpose,
so it installs dependencies by bare name (`--extra test`). `make constraints` turns the
`pip freeze` of a green latest run into `.ci/constraints.txt` (`--constraints FILE`).
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# torch comes from the machine's local CPU build, pinned by the Makefile.
SKIP = {"torch"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()


def dependency_names(extras: list[str]) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    names = dict.fromkeys(requirement_name(r) for r in requirements)
    return [n for n in names if n not in SKIP]


def constraints_from_freeze(freeze: str) -> list[str]:
    """Pinned lines for every index package; local builds keep their public version."""
    lines = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e")) or " @ " in line:
            continue  # editable installs and local wheel files are not pins
        lines.append(line.split("+", 1)[0])  # torch==2.13.0+cpu -> torch==2.13.0
    return sorted(lines, key=str.lower)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--extra", action="append", help="print bare dependency names")
    group.add_argument("--constraints", type=Path, help="pip freeze output to pin")
    args = parser.parse_args()
    if args.extra:
        print(" ".join(dependency_names(args.extra)))
        return 0
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                         text=True).stdout.split()[1]
    print(f"# Versions the main venv was verified with on {datetime.date.today()}"
          " (`make test-latest`, then `make constraints`).")
    print("# Installs resolve through this file (pip -c), so a new upstream release cannot"
          " turn CI red.")
    for line in [*constraints_from_freeze(args.constraints.read_text()), f"pip=={pip}"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
