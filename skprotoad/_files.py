"""Writing files so that nothing a user saved is lost or left half written."""

import os
import tempfile
from pathlib import Path

# Temporary files are named TEMP_PREFIX + 8 random characters + ".tmp".
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
        # A short name, not one derived from path's: a file name of up to 255
        # bytes is legal, the same name with a prefix and suffix may not be.
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    except OSError as exc:
        # name the user's file, not the temporary one
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as exc:  # a full disk, say: name the user's file
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
        # mkstemp creates the file private (0600); give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_without_replacing(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


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
