"""The command line's files: input images found, outputs guarded and written,
models saved and loaded.

What ``skprotoad fit``, ``predict``, ``evaluate`` and ``demo`` read and write,
apart from the scoring itself (:mod:`skprotoad.batch_scoring`). Failures the
user can act on raise :class:`CommandError`, which carries the exit code.

Kept free of heavy imports at module level (torch, numpy, Pillow, joblib are
imported where used): :mod:`skprotoad.cli` imports this module while building
its parser, and ``skprotoad --help`` should not wait for torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from ._files import write_new_file
from ._version import __version__

__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "CommandError", "OUTPUT_DIRS",
    "describe_error", "collect_images", "require_images", "output_names",
    "check_file_free", "prepare_out_dir", "write_json", "write_scores_csv",
    "write_skipped_csv", "save_model", "load_model", "kept_if_created", "check_distinct_outputs",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Files and folders `predict` and `demo` write into their output folder. The
# manifest lists the files a run writes (before it writes them); a later run
# replaces only those, never anything else the folder holds.
_OUTPUT_FILES = ("scores.csv", "skipped.csv", "run.json", "results.json", "grid.png")
OUTPUT_DIRS = ("overlays", "masks")
_MANIFEST = ".skprotoad-outputs.json"
# The one encoding of the files written and read (not the locale's); file
# names that are not valid in the locale's encoding are written as their bytes.
_TEXT = dict(encoding="utf-8", errors="surrogateescape")
# The model formats the CLI reads and writes, for messages.
_MODEL_FORMATS = (
    "a joblib file written by 'skprotoad fit', or a .safetensors file written by "
    "'skprotoad fit -o NAME.safetensors' or skprotoad.persistence.save"
)


class CommandError(Exception):
    """A failure reported as one line on stderr, with an exit code."""

    def __init__(self, message, code=EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def describe_error(exc):
    """One line for an exception: its message, with the type where the
    message alone would not say what happened (memory, torch's runtime errors).

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    message : str
    """
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (MemoryError, RuntimeError)) and not isinstance(exc, NotImplementedError):
        return f"{type(exc).__name__}: {message}"
    return message


def _is_image_name(path):
    from . import _images

    return path.suffix.lower() in _images.IMAGE_EXTENSIONS


def collect_images(inputs, max_pixels=None):
    """Expand files and folders into readable image files.

    Folders give their image files (sorted by name, not recursively; hidden
    files left out); files that are not images (by extension), broken links,
    files whose header cannot be read, or that have more than ``max_pixels``
    pixels are returned as skipped, with the reason. A file named explicitly
    is taken even when hidden.

    Parameters
    ----------
    inputs : sequence of str or path-like
    max_pixels : int, default=None
        Largest image accepted, in pixels; None: Pillow's own limit only.

    Returns
    -------
    paths : list of str
        Readable image files, in the order given; duplicates removed.
    skipped : list of (str, str)
        (path, reason) of files left out.

    Raises
    ------
    CommandError
        If an input does not exist (exit code 2).
    """
    candidates, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = [p for p in sorted(path.iterdir(), key=lambda p: p.name)
                       if not p.name.startswith(".")]
            files = [p for p in entries if p.is_file()]
            candidates += [p for p in files if _is_image_name(p)]
            skipped += [
                (str(p), "not an image file (extension)") for p in files if not _is_image_name(p)
            ]
            # listed, not dropped silently: the user may expect them scored
            skipped += [
                (str(p), "not a regular file" if p.exists() else "a broken link")
                for p in entries if not p.is_file() and not p.is_dir()
            ]
            subdirs = [p.name for p in entries if p.is_dir()]
            if subdirs and not any(_is_image_name(p) for p in files):
                skipped.append(
                    (str(path), f"holds no images; its sub-folders are not searched: "
                     f"{', '.join(subdirs[:5])}{' ...' if len(subdirs) > 5 else ''}")
                )
        elif path.is_file():
            if _is_image_name(path):
                candidates.append(path)
            else:
                skipped.append((str(path), "not an image file (extension)"))
        else:
            raise CommandError(f"no such file or folder: {item}", EXIT_USAGE)

    paths, seen = [], set()
    for path in candidates:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        reason = _unreadable_reason(path, max_pixels)
        if reason is None:
            paths.append(str(path))
        else:
            skipped.append((str(path), reason))
    return paths, skipped


def _unreadable_reason(path, max_pixels=None):
    """Why ``path`` cannot be used, from its header only (no pixel decoding), or None."""
    from PIL import Image, UnidentifiedImageError

    from . import _images

    try:
        with Image.open(path) as img:
            if img.mode in _images.HIGH_BIT_DEPTH_MODES:
                return (f"a {img.mode} (16-bit or float) image; convert it to 8-bit "
                        f"(or pass it to the Python API as a float array in [0, 1])")
            if max_pixels is not None and img.width * img.height > max_pixels:
                return (f"{img.width} x {img.height} = {img.width * img.height:,} pixels, "
                        f"more than --max-pixels {max_pixels:,} (it would take about "
                        f"{20 * img.width * img.height / 1e9:.1f} GB to score); raise "
                        f"--max-pixels to accept it")
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely: {exc}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"cannot read image: {exc}"
    return None


def require_images(paths, inputs):
    """Raise a CommandError naming ``inputs`` when no image was found there.

    Parameters
    ----------
    paths : list of str
        The images :func:`collect_images` found.
    inputs : list of str
        The files and folders given.
    """
    from . import _images

    if not paths:
        where = ", ".join(str(i) for i in inputs)
        raise CommandError(
            f"no readable image files ({', '.join(_images.IMAGE_EXTENSIONS)}) in {where}."
        )


def output_names(paths):
    """Distinct output file names (without extension) for input paths.

    The file's stem when it is unique; otherwise the parent folder's name and
    the stem (``good_001``), then the extension, then a counter. Names are
    compared case-insensitively, for case-insensitive file systems. A
    backslash becomes ``_`` (a folder separator on Windows, and never in a
    name a later ``--force`` run replaces).

    Examples
    --------
    >>> output_names(["a/x.png", "b/x.png", "b/y.png"])
    ['a_x', 'b_x', 'y']
    """
    stems = [Path(p).stem.replace("\\", "_") for p in paths]
    counts = Counter(s.casefold() for s in stems)
    names, used = [], set()
    for path, stem in zip(map(Path, paths), stems):
        candidates = [stem] if counts[stem.casefold()] == 1 else []
        parent = path.parent.name.replace("\\", "_")
        with_parent = f"{parent}_{stem}" if parent else stem
        candidates += [with_parent, f"{with_parent}_{path.suffix.lstrip('.').lower()}"]
        name = next((c for c in candidates if c.casefold() not in used), None)
        counter = 2
        while name is None:
            candidate = f"{candidates[-1]}-{counter}"
            name = candidate if candidate.casefold() not in used else None
            counter += 1
        used.add(name.casefold())
        names.append(name)
    return names


def check_file_free(path, force, what):
    """Refuse an existing ``path`` without ``force``, and one that cannot be
    written: checked before any work, so that a fit is not lost at the end.

    Parameters
    ----------
    path : path-like
    force : bool
        Accept an existing file (it is replaced later).
    what : str
        What the file is, for messages ("model file").

    Raises
    ------
    CommandError
        Exit code 2.
    """
    path = Path(path)
    # os.path's tests, not Path's: they answer False for a name too long,
    # which the probe below then reports
    if os.path.isdir(path):
        raise CommandError(f"{what} {path} is a folder; give a file name.", EXIT_USAGE)
    if os.path.exists(path) and not force:
        raise CommandError(f"{what} {path} exists; pass --force to overwrite it.", EXIT_USAGE)
    _check_writable(path.parent, f"{what} {path}", path.name)


def _check_writable(folder, what, longest_name=""):
    """Raise a CommandError naming ``what`` unless files named up to as long
    as ``longest_name`` can be created in ``folder``, or in its nearest
    existing parent where it does not exist yet."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"cannot write {what}: {existing} is not a folder.", EXIT_USAGE)
    try:
        # Trying is the only reliable test (os.access is wrong for root, for
        # read-only file systems and for ACLs). The probe's name is as long as
        # the longest to be written (mkstemp adds 8 characters): a name past
        # the file system's limit (255 bytes, or fewer) fails here, not after the work.
        prefix = ".skprotoad-probe-"
        prefix += "x" * (len(os.fsencode(longest_name)) - len(prefix) - 8)
        fd, probe = tempfile.mkstemp(prefix=prefix, dir=existing)
    except OSError as exc:
        raise CommandError(
            f"cannot write {what}: {exc.strerror or exc} ({existing}).", EXIT_USAGE
        ) from None
    os.close(fd)
    os.unlink(probe)


def prepare_out_dir(path, force, planned, command, inputs=(), replace_own=False):
    """Make ``path`` ready for a run that writes the files ``planned``.

    A folder that is not empty is refused without ``force``, except, with
    ``replace_own``, one that holds only the output of an earlier run of the
    same ``command`` (as its manifest records). Files
    an earlier run wrote (listed in its manifest) are removed: stale overlays
    would mislead. Anything else is never removed or replaced: a planned
    output that would replace another file, or an input, is refused even with
    ``force``. The new manifest is written before any output, so that even an
    interrupted run's files are known as ours.

    Parameters
    ----------
    path : path-like
    force : bool
    planned : list of str
        Files the run may write, relative to ``path`` (``overlays/x.png``).
    command : str
        The command writing them ("predict"), recorded in the manifest.
    inputs : list of str
        The run's input files, which must not be among the files replaced.
    replace_own : bool
        Replace an earlier run of ``command``'s output without ``force`` (the
        demo's folder); a manifest without a command is not ours.

    Returns
    -------
    path : pathlib.Path
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"output folder {path} is a file.", EXIT_USAGE)
    previous, previous_command = _read_manifest(path)
    previous = [p for p in previous if (path / p).is_file() or (path / p).is_symlink()]
    if path.is_dir() and any(path.iterdir()) and not force:
        foreign = _foreign_files(path, previous)
        if not (replace_own and not foreign and previous_command == command):
            listed = (_some(foreign) if foreign else f"the output of 'skprotoad {previous_command}'"
                      if previous_command else "an earlier skprotoad run's output")
            raise CommandError(
                f"output folder {path} is not empty ({listed}); pass --force to write into it "
                f"(only the files of an earlier skprotoad run there are replaced).",
                EXIT_USAGE,
            )
    own = set(previous)
    clashes = [p for p in planned if p not in own and (os.path.lexists(path / p))]
    if clashes:
        raise CommandError(
            f"output folder {path} holds files that skprotoad did not write and this run "
            f"would replace: {_some(clashes)}. Move them, or choose another folder.",
            EXIT_USAGE,
        )
    # checked now: a file named "overlays" failed the first image's write
    folders = {p.split("/")[0] for p in planned if "/" in p}
    not_folders = sorted(f for f in folders if os.path.lexists(path / f) and not (path / f).is_dir())
    if not_folders:
        raise CommandError(
            f"output folder {path} holds files named {_some(not_folders)} where this run "
            f"writes folders. Move them, or choose another folder.",
            EXIT_USAGE,
        )
    replaced = {os.path.realpath(path / p) for p in set(planned) | own}
    used = [p for p in inputs if os.path.realpath(p) in replaced]
    if used:
        raise CommandError(
            f"input files would be replaced by this run's outputs: {_some(used)}; "
            f"choose another output folder.",
            EXIT_USAGE,
        )
    longest = max((Path(p).name for p in planned), key=lambda n: len(os.fsencode(n)), default="")
    _check_writable(path, f"into output folder {path}", longest)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # listed before anything is removed or written: an interrupted run's
        # files stay known as ours (as the earlier command's: they are its files)
        _write_manifest(path, sorted(own | set(planned)), previous_command)
        for name in previous:
            (path / name).unlink(missing_ok=True)
        _write_manifest(path, sorted(planned), command)
    except OSError as exc:
        raise CommandError(f"cannot write into output folder {path}: {exc}", EXIT_USAGE) from None
    return path


def _some(names, limit=5):
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_output_name(name):
    """Whether ``name`` (from a manifest) is a path this tool writes: nothing
    else is ever removed, whatever a damaged or edited manifest says."""
    parts = name.split("/")
    if len(parts) == 1:
        return name in _OUTPUT_FILES
    if len(parts) == 2 and parts[0] == "report":
        from .report import PREDICTION_FILES  # imported here: the module is heavy

        return parts[1] in PREDICTION_FILES
    return (
        len(parts) == 2
        and parts[0] in OUTPUT_DIRS
        and parts[1].endswith(".png")
        and parts[1] != ".png"
        and "\\" not in parts[1]
    )


def _read_manifest(path):
    """The files an earlier run listed, and its command (None if not recorded)."""
    try:
        with open(Path(path) / _MANIFEST, **_TEXT) as f:
            manifest = json.load(f)
        files, command = manifest.get("files", []), manifest.get("command")
    except (OSError, ValueError, AttributeError):
        return [], None
    if not isinstance(files, list):
        return [], None
    files = [name for name in files if isinstance(name, str) and _is_output_name(name)]
    return files, command if isinstance(command, str) else None


def _write_manifest(path, files, command):
    write_json(Path(path) / _MANIFEST, {
        "written_by": f"{__package__} {__version__}",
        "command": command,
        "note": "files a later 'skprotoad predict --force', or a 'skprotoad demo' where "
                "the command is demo, may replace",
        "files": files,
    })


def _foreign_files(path, own):
    """Files in ``path`` that are not in ``own`` (relative names), at the top
    level and in the output sub-folders."""
    own = set(own) | {_MANIFEST}
    foreign = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.name in OUTPUT_DIRS and entry.is_dir() and not entry.is_symlink():
            foreign += [
                f"{entry.name}/{p.name}" for p in sorted(entry.iterdir(), key=lambda p: p.name)
                if f"{entry.name}/{p.name}" not in own
            ]
        elif entry.name not in own:
            foreign.append(entry.name)
    return foreign


def write_json(path, data, overwrite=True):
    """Write ``data`` as indented JSON, atomically.

    NumPy scalars and arrays and tuples are written as numbers and lists,
    anything else JSON does not know as its ``str``.

    Parameters
    ----------
    path : path-like
    data : dict
    overwrite : bool, default=True
        Replace an existing file; without it, one (even one created while
        the command ran) is kept and the command fails, naming ``--force``.
    """

    def write(tmp):
        with open(tmp, "w", **_TEXT) as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")

    with kept_if_created():
        write_new_file(path, write, overwrite=overwrite)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    return str(value)


def _is_safe_format_name(path):
    return Path(path).suffix.lower() == ".safetensors"


def save_model(detector, path, overwrite=False):
    """Save ``detector`` with joblib, or in the safe format when ``path`` ends
    in .safetensors; atomically.

    Parameters
    ----------
    detector : ProtoADDetector
    path : path-like
    overwrite : bool, default=False
        Replace an existing file (``--force``); without it, one (even one
        created while the command ran) is kept and the command fails, with
        the model written beside it (``NAME-1.joblib``, ...) so that the fit
        is not lost.
    """
    try:
        _save_model(detector, path, overwrite)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True to replace it.",
                                   "it was created while this command ran and is kept")
        path = Path(path)
        for n in range(1, 100):
            beside = path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                _save_model(detector, beside, overwrite=False)
            except FileExistsError:
                continue
            except OSError:  # a name made too long, say: report the first failure
                break
            raise CommandError(f"{message}; this fit's model was written to "
                               f"{str(beside)!r} instead.") from None
        raise CommandError(f"{message}, and this fit's model was not written "
                           f"(pass --force to replace it).") from None


def _save_model(detector, path, overwrite):
    if _is_safe_format_name(path):
        from .persistence import save

        save(detector, path, overwrite=overwrite)
        return
    import joblib

    write_new_file(path, lambda tmp: joblib.dump(detector, tmp), overwrite=overwrite)


@contextlib.contextmanager
def kept_if_created():
    """Report a file that a write without ``--force`` refused: one created
    after :func:`check_file_free` checked, while the command ran."""
    try:
        yield
    except FileExistsError as exc:
        # the library's message names overwrite=True; the option here is --force
        raise CommandError(str(exc).replace(
            "pass overwrite=True to replace it",
            "it was created while this command ran and is kept, and this result was not "
            "written (pass --force to replace it)",
        )) from None


def check_distinct_outputs(files, folders=()):
    """Refuse two options that write the same file (``-o X --save-model X``),
    or a file where another option writes a folder; before any work.

    Parameters
    ----------
    files : list of (str, path-like)
        (option, a file it writes); None paths are left out.
    folders : list of (str, path-like)
        (option, a folder it writes into).

    Raises
    ------
    CommandError
        Exit code 2.
    """
    outputs = [(option, Path(os.path.realpath(p)), p, is_file)
               for entries, is_file in ((files, True), (folders, False))
               for option, p in entries if p is not None]
    for k, (option, real, given, is_file) in enumerate(outputs):
        for other, other_real, _, other_is_file in outputs[k + 1:]:
            if option != other and (real == other_real or (is_file and real in other_real.parents)
                                    or (other_is_file and other_real in real.parents)):
                raise CommandError(f"{option} and {other} both write {given}; give them "
                                   f"different paths.", EXIT_USAGE)


def _looks_like_safetensors(path):
    """A safetensors file: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(10)
    size = int.from_bytes(head[:8], "little") if len(head) == 10 else -1
    return head[8:] == b'{"' and 0 < size <= os.path.getsize(path) - 8


def load_model(path):
    """Load a fitted detector from either format :func:`save_model` writes.

    A file named ``.safetensors``, or whose content is a safetensors file, is
    read with :func:`skprotoad.persistence.load` and never unpickled.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    detector : fitted ProtoADDetector

    Raises
    ------
    CommandError
        If ``path`` does not exist (exit code 2), or holds no fitted
        ProtoADDetector (exit code 1).
    """
    from sklearn.utils.validation import check_is_fitted

    from .detector import ProtoADDetector

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"no such model file: {path}", EXIT_USAGE)
    # by name, or by content: a file named .safetensors is never unpickled
    if _is_safe_format_name(path) or _looks_like_safetensors(path):
        from .persistence import load

        try:
            return load(path)
        except ValueError as exc:  # names the file and the check that failed
            raise CommandError(f"cannot load model: {exc}") from exc
    import joblib

    try:
        detector = joblib.load(path)
    except ValueError as exc:  # ours: a damaged model, another format version
        raise CommandError(f"cannot load model {path}: {exc}") from exc
    except Exception as exc:  # any unpickling failure means the same to the user
        # where the file is cut decides which of the two the unpickler raises
        ends_early = isinstance(exc, EOFError) or "exhausted" in str(exc)
        detail = "the file ends early (truncated?)" if ends_early else describe_error(exc)
        # the unpickler's own words ("Memo value not found at index 101", or a
        # bare opcode number) mean nothing to a user: say what was read instead
        if not ends_early and (detail.strip().isdigit() or "memo" in detail.lower()):
            detail = "its bytes are not a pickle that joblib can read"
        raise CommandError(
            f"cannot load model {path}: it is not a skprotoad model ({detail}). Models are "
            f"{_MODEL_FORMATS}."
        ) from exc
    if not isinstance(detector, ProtoADDetector):
        raise CommandError(
            f"{path} holds a {type(detector).__name__}, not a ProtoADDetector "
            f"(write models with 'skprotoad fit')."
        )
    try:
        check_is_fitted(detector, "network_")
    except Exception as exc:
        raise CommandError(f"the model in {path} is not fitted.") from exc
    return detector


def _write_text(path, text):
    """Write ``path`` atomically: a reader never sees it half written."""

    def write(tmp):
        with open(tmp, "w", newline="", **_TEXT) as f:
            f.write(text)

    write_new_file(path, write, overwrite=True)


def write_scores_csv(path, paths, result, extra=None):
    """Write ``scores.csv``: one row per scored image, atomically.

    Parameters
    ----------
    path : path-like
    paths : list of str
        The scored images, in the order of ``result``'s rows.
    result : dict
        From :func:`skprotoad.batch_scoring.score_and_write`.
    extra : dict of str to list, default=None
        More columns, name -> one value per row.
    """
    extra = extra or {}
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "label", "width", "height", "overlay", "mask", *extra])
        for row, p in enumerate(paths):
            height, width = result["size"][row]
            writer.writerow([
                p,
                f"{result['score'][row]:.8g}",
                "anomaly" if result["anomaly"][row] else "normal",
                width,
                height,
                result["overlay"][row],
                result["mask"][row],
                *(values[row] for values in extra.values()),
            ])
        _write_text(path, f.getvalue())


def write_skipped_csv(path, skipped):
    """Write ``skipped.csv`` of (path, reason) rows, atomically.

    Parameters
    ----------
    path : path-like
    skipped : list of (str, str)
    """
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
        _write_text(path, f.getvalue())


