"""What several benchmarks share: their JSON output and this process's memory figures.

Standard library only at import, so `gptqmodel_child.py` can use it inside the interop
venv without quantkit's stack.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path


def status_kb(field: str) -> int:
    """One field of /proc/self/status in kB (VmRSS, VmHWM, ...), Linux only."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def peak_rss_bytes() -> int:
    """This process's own peak resident set (VmHWM). Not getrusage: ru_maxrss survives
    exec, so a child of a big parent would report the parent's peak."""
    return status_kb("VmHWM") * 1024


def emit_json(results: dict, out: str | Path | None, log: logging.Logger) -> None:
    """Write `results` atomically to `out` (its folder created), or print them when no
    --out was given."""
    if not out:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
        return
    from quantkit.checkpoint import write_json_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    log.info("wrote %s", out)
