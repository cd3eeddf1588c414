"""Text corpora: the embedded default (the Python standard library's own sources) and text files.

The default needs nothing but the interpreter running this code: every machine has it offline.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = ["read_text_file", "stdlib_text"]


def stdlib_text(max_bytes: int = 2_000_000) -> str:
    """The first ``max_bytes`` bytes of the standard library's top-level ``*.py`` files, in sorted
    order (deterministic for a given Python version), decoded as UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size == 0:
        raise RuntimeError(f"found no Python sources under the standard library folder {root}")
    return b"".join(chunks)[:max_bytes].decode("utf-8", errors="replace")


def read_text_file(path: str | Path, min_chars: int = 1000) -> str:
    """Read a UTF-8 text file, with a one-line ``ValueError`` naming the problem and the fix when it
    is missing, unreadable, binary or shorter than ``min_chars`` characters."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"data file {path} does not exist or is not a file; pass --data PATH to a text file"
        )
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(
            f"data file {path} cannot be read ({error.strerror}); check its permissions"
        ) from None
    if b"\x00" in raw[:65536]:
        raise ValueError(
            f"data file {path} looks binary (it holds NUL bytes); pass a UTF-8 text file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8"
        ) from None
    if len(text) < min_chars:
        raise ValueError(
            f"data file {path} holds {len(text)} characters, fewer than the {min_chars} needed; pass a longer text"
        )
    return text
