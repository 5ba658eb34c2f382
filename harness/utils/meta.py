"""Where this code came from: `git describe` of a checkout, else the file's modification date."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def date_modified(path: str | Path = __file__) -> str:
    """The file's modification date as 'YYYY-M-D' (YOLOv5's format)."""
    t = datetime.datetime.fromtimestamp(Path(path).stat().st_mtime)
    return f"{t.year}-{t.month}-{t.day}"


def git_describe(path: str | Path = _PACKAGE) -> str:
    """`git describe --tags --long --always` of the repository holding `path`; '' outside a repo."""
    path = Path(path)
    cwd = path if path.is_dir() else path.parent
    try:
        out = subprocess.run(["git", "-C", str(cwd), "describe", "--tags", "--long", "--always"],
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def describe_version() -> str:
    """For banners: the git description of this checkout, else the package's date."""
    return git_describe() or date_modified(_PACKAGE / "__init__.py")
