"""Atomic publication into a model repository: entries are built aside, checked, then moved in by rename.

Triton may be polling the repository while an export runs, so a model directory must appear (or be
replaced) whole or not at all. Triton (2.51, tried) tries to load *every* subdirectory of a
repository, hidden ones included, so work happens in a hidden staging directory *next to* the
repository (same file system, so a rename can move it in); only where that is impossible (the
repository is a mount point, or its parent is read-only) does staging fall back to the inside.

``Staging`` is the one way an entry is written - by the plain export, the precision variants, the
TensorRT entry and ``--add-version``: ``Staging.entry`` opens a staging directory, ``StagedEntry``
copies files into its version directory (recording their hashes) and writes config and manifest, and
``Staging.publish`` moves every staged entry in with ``publish``: ``renameat2(RENAME_NOREPLACE)``
(never clobbers a model another export just wrote) or, with ``force``, ``renameat2(RENAME_EXCHANGE)``
(old and new swap in one step), falling back to plain renames where the kernel or file system lacks
them. Staging directories are removed on exit whatever happens.

Adding a version to an existing entry publishes in three steps instead, each atomic
(``export.versions.publish_versions``): ``publish_version`` renames the staged ``<N>`` directory into
the entry, then ``replace_file`` swaps in manifest.json and config.pbtxt. A crash between them leaves
a version directory the manifest does not describe yet (served, with an empty weights hash), never a
broken entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from contract.manifest import Manifest
from export.errors import ExportUsageError
from export.layout import sha256_file, write_entry_files

log = logging.getLogger(__name__)

STAGING_MODE = 0o755  # mkdtemp makes 0700 dirs; a Triton running as another user must read the model


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so a published model survives a crash."""
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            with open(os.path.join(dirpath, fn), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False when the kernel, libc or file system does not offer ``flags``."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exists_message(target: Path) -> str:
    """What to tell a user whose export would overwrite the model at ``target``."""
    versions = sorted(p.name for p in target.iterdir() if p.is_dir()) if target.is_dir() else []
    return (f"model {target.name!r} already exists in {target.parent} (versions {versions}); "
            "pass --force (force=True) to replace it, or choose another --name")


def _rename_noreplace(source: Path, target: Path, message: Callable[[Path], str]) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (then ``ExportUsageError(message(target))``).

    ``renameat2(RENAME_NOREPLACE)`` where the kernel has it; else a plain rename, which still fails
    with ENOTEMPTY (turned into the same error by the callers) if a non-empty ``target`` appeared.
    """
    if not _renameat2(source, target, _RENAME_NOREPLACE):
        if target.exists():
            raise ExportUsageError(message(target))
        os.rename(source, target)


def publish(staging: Path, target: Path, force: bool) -> None:
    """Move the finished ``staging`` directory to ``target`` in one rename; replace only if ``force``."""
    try:
        if not (force and target.exists()):
            _rename_noreplace(staging, target, exists_message)
        elif _renameat2(staging, target, _RENAME_EXCHANGE):
            shutil.rmtree(staging)  # staging now holds the old model
        else:  # no atomic exchange here: two renames, rolled back if the second fails
            old = Path(tempfile.mkdtemp(prefix=f".vitserve-old-{target.name}-", dir=staging.parent))
            os.rename(target, old / "model")
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old / "model", target)
                raise
            shutil.rmtree(old)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ExportUsageError(exists_message(target)) from e
        raise
    _fsync_dir(target.parent)


def _version_appeared(target: Path) -> str:
    return (f"version {target.name} of model {target.parent.name!r} appeared in {target.parent.parent} while "
            "this export ran (another export?); it was left as it is")


def publish_version(staged: Path, target: Path, force: bool) -> Path | None:
    """Move the staged version directory ``staged`` to ``target`` (``<entry>/<N>``) in one rename.

    Without ``force`` an existing ``target`` is refused (``renameat2(RENAME_NOREPLACE)``); with it the
    old version is swapped out (``RENAME_EXCHANGE``, else two renames) and left at the returned path
    beside ``staged`` (the staging directory's cleanup deletes it), so ``withdraw_version`` can undo.
    """
    replaced = staged.with_name(staged.name + ".replaced")
    try:
        if not (force and target.exists()):
            _rename_noreplace(staged, target, _version_appeared)
            _fsync_dir(target.parent)
            return None
        if _renameat2(staged, target, _RENAME_EXCHANGE):
            os.rename(staged, replaced)  # staged now holds the old version
        else:  # no atomic exchange here: two renames, rolled back if the second fails
            os.rename(target, replaced)
            try:
                os.rename(staged, target)
            except OSError:
                os.rename(replaced, target)
                raise
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ExportUsageError(_version_appeared(target)) from e
        raise
    _fsync_dir(target.parent)
    return replaced


def withdraw_version(staged: Path, target: Path, replaced: Path | None) -> None:
    """Undo ``publish_version``: the new version back to ``staged``, the replaced one (if any) back in.

    Used when a later entry of the same export cannot be published; not atomic (the version is
    briefly absent), which Triton sees as a version removed and added again, never as a broken one.
    """
    os.rename(target, staged)
    if replaced is not None:
        os.rename(replaced, target)
    _fsync_dir(target.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file beside it, fsync, ``os.replace``.

    The new file keeps the old one's permission bits (a Triton running as another user reads it).
    """
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


_STAGING_PID = re.compile(r"\.pid(\d+)\.[^.]*$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_abandoned_staging(parent: Path, repository: Path) -> list[Path]:
    """Remove staging directories of ``repository`` whose export process is gone (killed mid-write).

    A staging directory's name carries its exporter's pid; one whose process no longer exists can only
    be the remains of an export that was killed, never a model, so it is deleted. Directories of live
    exports (and names without a pid, from older versions) are left alone.
    """
    removed = []
    for path in parent.glob(f".vitserve-staging-{repository.resolve().name}-*"):
        m = _STAGING_PID.search(path.name)
        if m is None or not path.is_dir() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an export (pid %s) that did not finish", path, m.group(1))
        removed.append(path)
    return removed


def staging_parent(repository: Path) -> Path:
    """Where to build a model for ``repository``: its parent when writable and on the same file system."""
    repository = repository.resolve()
    parent = repository.parent
    try:
        same_fs = os.stat(parent).st_dev == os.stat(repository).st_dev
    except OSError:
        same_fs = False
    if same_fs and os.access(parent, os.W_OK | os.X_OK):
        return parent
    log.warning("staging inside the model repository %s (its parent is not a writable directory on "
                "the same file system); a polling Triton may log errors for the staging directory",
                repository)
    return repository


@contextlib.contextmanager
def staging_directory(repository: Path, name: str) -> Iterator[Path]:
    """A hidden scratch directory beside ``repository``, removed on exit whatever happens."""
    parent = staging_parent(repository)
    sweep_abandoned_staging(parent, repository)
    prefix = f".vitserve-staging-{repository.resolve().name}-{name}.pid{os.getpid()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(staging, STAGING_MODE)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_existing(targets: Sequence[Path], force: bool) -> None:
    """``ExportUsageError`` for the first of ``targets`` that exists, unless ``force`` (before the slow part;
    ``publish`` checks again at the rename)."""
    for target in targets:
        if target.exists() and not force:
            raise ExportUsageError(exists_message(target))


class StagedEntry:
    """One entry being built in its staging directory ``root``: version files first, then config and manifest."""

    def __init__(self, root: Path, target: Path, version: int) -> None:
        self.root, self.target, self.version = root, target, version
        self.version_dir = root / str(version)
        self.version_dir.mkdir()
        self.files: dict[str, str] = {}  # "<version>/<file>" -> sha256, the manifest's ``files``

    def add_file(self, filename: str, source: Path | None = None) -> Path:
        """Record ``<version>/<filename>`` and its hash, copying ``source`` there first when given."""
        path = self.version_dir / filename
        if source is not None:
            shutil.copyfile(source, path)
        self.files[f"{self.version}/{filename}"] = sha256_file(path)
        return path

    def finish(self, manifest: Manifest, config_text: str) -> None:
        """Write config.pbtxt and manifest.json, then flush the whole entry to disk."""
        write_entry_files(self.root, manifest, config_text)
        fsync_tree(self.root)


class Staging:
    """Entries of ``version`` staged beside ``repository`` (a context manager that removes the staging
    directories on exit); published together by ``publish``, or, if the block fails first, not at all."""

    def __init__(self, repository: Path, version: int, force: bool) -> None:
        self.repository, self.version, self.force = Path(repository), version, force
        self.entries: list[StagedEntry] = []
        self._cleanup = contextlib.ExitStack()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup.close()

    def entry(self, name: str) -> StagedEntry:
        """A new staged entry that will be published as ``repository/<name>``."""
        root = self._cleanup.enter_context(staging_directory(self.repository, name))
        staged = StagedEntry(root, self.repository / name, self.version)
        self.entries.append(staged)
        return staged

    def publish(self) -> list[Path]:
        """Move every finished entry into place (``publish``); return their paths."""
        for staged in self.entries:
            publish(staged.root, staged.target, self.force)
        return [staged.target for staged in self.entries]
