"""Writing files so that nothing a user saved is lost or left half written."""

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

# Temporary files are named TEMP_PREFIX + 8 random hex digits + ".tmp".
TEMP_PREFIX = ".skprotoad-"


def refuse_existing(path, overwrite):
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")


def write_new_file(path, write, overwrite=False):
    """Call ``write(tmp_path)`` and move the result onto ``path``; return ``path``.

    An interrupted write leaves no partial file, and without ``overwrite`` an
    existing file is never replaced, even one that appears while writing.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary_file(path.parent)
    except OSError as exc:
        # name the user's file, not the temporary one
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    try:
        # the mode the umask gives a new file, for the result; private while written
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        os.chmod(tmp, 0o600)
        try:
            write(tmp)
        except OSError as exc:  # a full disk, say: name the user's file
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
        if overwrite:
            # a file replaced keeps its permissions (a private model stays private)
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(tmp, mode)
        (os.replace if overwrite else _publish_without_replacing)(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _new_temporary_file(folder):
    """Create an empty file of a new name in ``folder``, with the permissions
    of any new file (0666 less the umask); return its path.

    Not ``tempfile.mkstemp``: its files are private (0600), and reading the
    umask to widen them means setting it, for the whole process, meanwhile.
    A short name, not one derived from the target's: a name of 255 bytes is
    legal, the same with a prefix and suffix is not.
    """
    for _ in range(100):
        tmp = Path(folder) / f"{TEMP_PREFIX}{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(errno.EEXIST, f"no free temporary file name in {folder}")


def _publish_without_replacing(tmp, path):
    try:
        # A hard link fails if the target exists, atomically: no window in
        # which another writer's file could be replaced.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.") from None
    except OSError:
        # File systems without hard links: check, then move.
        refuse_existing(path, False)
        os.replace(tmp, path)
