"""Debian's Chromium for the browser tests: found where it is, installed with apt when missing.

Playwright's own browser downloads are not used (`playwright install` needs a CDN that CI
does not reach); Playwright drives the Debian package through `executable_path`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ENV_VARIABLE = "FLOWLEDGER_CHROMIUM"
DEBIAN_PATH = Path("/usr/bin/chromium")
# pytest-xdist workers each run this; the first to take the lock installs, the others wait
# and then find what it installed.
LOCK = Path("/tmp/flowledger-chromium-install.lock")
# Wait for another apt (unattended-upgrades, a developer) rather than fail on dpkg's lock.
APT_GET = ("apt-get", "-o", "DPkg::Lock::Timeout=300", "-q")
INSTALL = (*APT_GET, "install", "-y", "chromium")  # with its fonts: screenshots are read
UPDATE = (*APT_GET, "update")
APT_TIMEOUT = 1200.0
VERSION_TIMEOUT = 60.0
BY_HAND = (
    "install it by hand: `sudo apt-get update && sudo apt-get install -y chromium`, "
    "or set FLOWLEDGER_CHROMIUM to a Chromium or Chrome executable"
)


@dataclass(frozen=True)
class Attempt:
    """One apt-get command run and how it ended."""

    argv: tuple[str, ...]
    code: int
    output: str

    def __str__(self) -> str:
        tail = "\n".join(self.output.strip().splitlines()[-25:])
        return f"$ {' '.join(self.argv)}  (exit {self.code})\n{tail}"


def chromium_executable() -> Path:
    """The Chromium to drive, installing Debian's package first if there is none; fails the
    test, naming what was tried, when there still is none."""
    found = _find()
    if found is not None:
        return _verified(found, [])
    # Read-only is enough for flock, and works on a lock file another user created.
    with open(os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o666)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        found = _find()  # another worker may have installed it while this one waited
        attempts = [] if found is not None else _install()
        found = _find()
    if found is None:
        _fail("Chromium is still not installed", attempts)
    return _verified(found, attempts)


def _find() -> Path | None:
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            _fail(f"{ENV_VARIABLE}={configured} is not an executable file", [])
        return path
    if DEBIAN_PATH.is_file() and os.access(DEBIAN_PATH, os.X_OK):
        return DEBIAN_PATH
    on_path = shutil.which("chromium")
    return Path(on_path) if on_path else None


def _install() -> list[Attempt]:
    """apt-get install; if that fails, apt-get update and install again."""
    if shutil.which("apt-get") is None:
        _fail("there is no apt-get on this machine to install it with", [])
    if os.geteuid() == 0:
        prefix: tuple[str, ...] = ()
    elif shutil.which("sudo"):
        prefix = ("sudo", "-n")  # never prompts: fails at once without a rule
    else:
        _fail("installing it needs root, and this is not root (and there is no sudo)", [])
    attempts = [_run((*prefix, *INSTALL))]
    if attempts[-1].code != 0:
        attempts.append(_run((*prefix, *UPDATE)))
        attempts.append(_run((*prefix, *INSTALL)))
    return attempts


def _run(argv: tuple[str, ...]) -> Attempt:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=APT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return Attempt(argv, -1, f"{out}\n(killed after {APT_TIMEOUT:.0f} s)")
    except OSError as exc:
        return Attempt(argv, -1, str(exc))
    return Attempt(argv, done.returncode, done.stdout)


def _verified(path: Path, attempts: list[Attempt]) -> Path:
    """`path` once `chromium --version` answers; Debian's wrapper script writes a harmless
    `[: ...: unexpected operator` on stderr, which is ignored."""
    try:
        done = subprocess.run(
            [str(path), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _fail(f"`{path} --version` did not run: {exc}", attempts)
    version = done.stdout.strip()
    if done.returncode != 0 or "chrom" not in version.lower():
        _fail(
            f"`{path} --version` exited {done.returncode} with {version!r} "
            f"(stderr: {done.stderr.strip()[-500:]!r})",
            attempts,
        )
    return path


def _fail(problem: str, attempts: list[Attempt]) -> NoReturn:
    tried = "\n\n".join(str(a) for a in attempts) or "(no apt-get command was run)"
    pytest.fail(
        "\n".join(
            [
                "=" * 78,
                f"THE BROWSER TESTS NEED CHROMIUM: {problem}.",
                f"Looked for ${ENV_VARIABLE} ({os.environ.get(ENV_VARIABLE) or 'unset'}), "
                f"{DEBIAN_PATH}, and `chromium` on PATH.",
                "apt-get commands tried (output tails):",
                tried,
                f"To fix: {BY_HAND}.",
                "=" * 78,
            ]
        ),
        pytrace=False,
    )
