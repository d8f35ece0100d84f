"""The console's assets: the vendored files are the ones SOURCES.md names, and a built wheel
carries every template and asset (the console must work from an installed package, with
no network)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from flowledger.adapters.console.pages import HERE, STATIC

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = (".git", ".venv", "artifacts", ".flowledger", "build", "*.egg-info", "__pycache__",
              ".hypothesis", ".mypy_cache", ".ruff_cache", ".pytest_cache")  # fmt: skip


def test_vendored_files_match_the_checksums_in_sources() -> None:
    table = (STATIC / "vendor" / "SOURCES.md").read_text()
    rows = re.findall(r"^\| (\S+) \|.*\| ([0-9a-f]{64}) \|$", table, re.MULTILINE)
    assert len(rows) == 3
    for name, digest in rows:
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest


def test_pages_name_only_assets_that_exist() -> None:
    for template in (HERE / "templates").glob("*.html"):
        for asset in re.findall(r'"/ui/static/([^"]+)"', template.read_text()):
            assert (STATIC / asset).is_file(), (template.name, asset)


def test_the_wheel_carries_the_templates_and_assets(tmp_path: Path) -> None:
    # Built from a copy: pip builds in the source tree, and the checkout stays untouched.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), source],
        check=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("flowledger-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    console = "flowledger/adapters/console/"
    wanted = {console + p.relative_to(HERE).as_posix() for p in (HERE / "templates").glob("*")}
    wanted |= {console + p.relative_to(HERE).as_posix() for p in STATIC.rglob("*") if p.is_file()}
    assert wanted <= names, sorted(wanted - names)
