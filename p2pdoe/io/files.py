"""Reading text files with one clear error line instead of a traceback."""

from __future__ import annotations

from pathlib import Path

from p2pdoe.errors import P2PDoeError


def read_text(path: Path, what: str, error: type[P2PDoeError]) -> str:
    """The UTF-8 text of `path`; `error` naming `what` the file is if it cannot be read or decoded."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text") from exc
