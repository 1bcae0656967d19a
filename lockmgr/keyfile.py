"""Shared-secret key files (``clusterfs keygen``).

A key file holds 32 random bytes as 64 hex digits and a newline, mode 0600.
"""

import logging
import os
import secrets
import stat

from .wire import KEY_MIN

log = logging.getLogger(__name__)

KEY_BYTES = 32


class KeyFileError(Exception):
    """The key file cannot be created or read (message is one line)."""


def keygen(path: str, *, force: bool = False) -> None:
    """Create a new random key file at ``path`` with mode 0600.

    Raises:
        KeyFileError: the file exists (and not ``force``) or cannot be written.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if not force:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists (use --force to overwrite)") from None
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key(path: str) -> bytes:
    """Read a key file: hex digits (as written by ``keygen``) or raw bytes.

    Raises:
        KeyFileError: missing, unreadable, or shorter than 16 bytes.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(65536)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found (create one with "
                           f"'clusterfs keygen {path}')") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by others (mode %o); chmod 600 it",
                    path, st.st_mode & 0o777)
    text = data.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = data
    if len(key) < KEY_MIN:
        raise KeyFileError(f"key file {path} holds fewer than {KEY_MIN} bytes")
    return key
