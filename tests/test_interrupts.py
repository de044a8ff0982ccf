"""Ctrl-C ends quantkit with exit code 2, wherever it lands.

CPython remembers an exact KeyboardInterrupt that crosses a `PyRun_String` call (how C
extensions run Python code) and re-kills the process with SIGINT at exit, even after the
exception was caught: the CLI then printed its one error line but exited -2. This runs
that situation for real in a child process.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import ctypes, sys
from quantkit.interrupts import signals_raise

api = ctypes.pythonapi
api.PyRun_String.restype = ctypes.py_object
api.PyRun_String.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
code = b"import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n"
with signals_raise():
    try:
        api.PyRun_String(code, 257, {}, {})  # 257: Py_file_input
    except KeyboardInterrupt as exc:
        print(type(exc).__name__, flush=True)
sys.exit(2)
"""


def test_sigint_inside_c_run_python_code_still_exits_with_the_given_code():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "Interrupted", done.stderr
    assert done.returncode == 2, done.stderr
