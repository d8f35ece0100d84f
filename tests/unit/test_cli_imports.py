"""What importing the CLI costs every command."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_loads_no_web_framework_unless_it_serves():
    """FastAPI and uvicorn cost about a fifth of every command's start: only serve needs
    them, so importing the CLI must not import them."""
    probe = (
        "import sys, flowledger.adapters.cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
