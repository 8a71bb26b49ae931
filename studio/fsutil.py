"""File-system helpers: atomic writes (a kill at any moment leaves the last good file in
place) and reading only regular files (a pipe named like an image would block forever)."""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from studio.errors import StudioError

#: What a temporary name adds to the target's name besides its suffix: "." + "." + 8 random characters.
_TEMP_EXTRA_BYTES = 10


class NotAFile(StudioError):
    """A path that must be a readable regular file is missing, a folder, a pipe, a socket or
    a device, or cannot be opened."""


class PathInTheWay(StudioError):
    """A file cannot be written where asked: the target is a folder, or a parent is a file."""


def open_regular(path: str | os.PathLike, what: str = "File") -> BinaryIO:
    """Open `path` for reading in binary mode, refusing anything but a regular file with a
    NotAFile (a StudioError) naming `what` and the path. Never blocks on a FIFO."""
    path = Path(path)
    try:
        _check_regular(os.stat(path).st_mode, path, what)  # a socket cannot even be opened
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise NotAFile(f"{what} {path} does not exist; check the path.") from None
    except OSError as exc:
        raise NotAFile(f"{what} {path} cannot be read ({exc.strerror}); check its permissions.") from None
    try:
        _check_regular(os.fstat(fd).st_mode, path, what)  # it may have been swapped since
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(mode: int, path: Path, what: str) -> None:
    if stat.S_ISDIR(mode):
        raise NotAFile(f"{what} {path} is a folder, not a file; give the path of a file.")
    if not stat.S_ISREG(mode):
        raise NotAFile(f"{what} {path} is not a regular file (a pipe, socket or device); give the path of a file.")


def read_regular_bytes(path: str | os.PathLike, what: str = "File") -> bytes:
    with open_regular(path, what) as handle:
        return handle.read()


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of `folder` allows."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def create_temp_file(folder: Path, name: str, suffix: str = ".tmp") -> Path:
    """A new empty file `.<name>.<random><suffix>` in `folder`, created with the permissions
    of any new file (0666 minus the umask). `name` is shortened as needed, so the temporary
    name fits the file system for any `name` that does."""
    budget = name_max(folder) - _TEMP_EXTRA_BYTES - len(os.fsencode(suffix))
    while len(os.fsencode(name)) > budget:
        name = name[:-1]
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name in {folder}")


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that is an existing folder (or has a file
    where a folder should be); creates nothing."""
    target = Path(path)
    if target.is_dir():
        raise PathInTheWay(f"{target} is a folder; give the name of a file to write instead.")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PathInTheWay(f"Cannot write {target}: {parent} is a file, not a folder; write somewhere else.")
            break
    return target


def _writable_target(path: str | os.PathLike) -> Path:
    target = check_output_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PathInTheWay(f"Cannot create {target}: a file is in the way of its folder {target.parent}; "
                           "move that file or write somewhere else.") from None
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it
    over `path`. On any error the temporary file is removed and `path` is untouched. A
    target that is a folder, or under a file, raises PathInTheWay (a StudioError)."""
    target = _writable_target(path)
    tmp = create_temp_file(target.parent, target.name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically create `path` with a library writer that takes a file path
    (e.g. `lambda p: safetensors.torch.save_file(tensors, p)`)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves behind when its process is killed
    (kill -9 skips the cleanup). Call only on folders no other live process writes to."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
