"""Local paths and fsspec URLs (``s3://...``) behind one small interface.

Writes are atomic, all through :class:`Staged`: a local file is written under a temporary name
in the same folder and then renamed; an object store gets the finished file in one upload (S3
shows an object only once its PUT or multipart upload completes). Nothing half-written ever
carries a final name. A folder on an object store, which no single request can publish, is
uploaded under a temporary prefix and then copied to its final prefix with its ``marker``
file last: a reader takes the folder to exist only once the marker does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from rainforest.errors import ParameterError, RainforestError, StorageError

#: File name endings searched for when a source is a directory.
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".wav", ".wave", ".aif", ".aiff")

_HASH_CHUNK = 8 << 20
TEMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class SourceFile:
    """A song's location and size, as listed before any decoding.

    ``problem`` says why a listed path cannot be a song (a broken or looping link).
    """

    url: str
    size: int
    problem: str | None = None


# Exceptions of the object-store clients that mean "the store failed", beside OSError.
_STORE_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3"}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the storage itself (full, gone, unreachable)."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in _STORE_MODULES


@contextlib.contextmanager
def reported(action: str):
    """Turn a storage failure during ``action`` into a :class:`StorageError` that says what
    happened and what to do; other errors pass through unchanged."""
    try:
        yield
    except RainforestError:
        raise
    except Exception as error:
        if not is_storage_failure(error):
            raise
        cause = f"{type(error).__name__}: {error}"
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            cause = f"no space left on the device ({error})"
        raise StorageError(
            f"{action} failed: {cause}. Fix the storage (free space, check the path, the "
            "mount or the object store), then re-run the same command: finished work is kept"
        ) from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$RAINFOREST_CACHE``, else
    ``~/.cache/rainforest``.

    Examples
    --------
    >>> cache_root("/tmp/songs")
    PosixPath('/tmp/songs')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RAINFOREST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rainforest"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str):
    """The fsspec filesystem and the path within it for ``url`` (a local path or URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def canonical(url: str) -> str:
    """Absolute local path, or the URL unchanged."""
    if is_remote(url):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _url_for(fs, path: str, template: str) -> str:
    if is_remote(template):
        protocol = template.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def list_sources(sources: Iterable[str]) -> list[SourceFile]:
    """Expand files, directories (searched recursively by audio extension) and URLs.

    A file named explicitly is taken whatever its extension. The result is sorted by URL and
    free of repeats, so the same inputs always give the same list.
    """
    found: dict[str, SourceFile] = {}
    for source in sources:
        source = canonical(str(source))
        if not is_remote(source) and os.path.isdir(source):
            found.update((f.url, f) for f in _walk_local(source))
            continue
        fs, path = filesystem(source)
        if not fs.exists(path):
            raise ParameterError(f"no such file or directory: {source}")
        if fs.isdir(path):
            for child, info in fs.find(path, detail=True).items():
                if info.get("type") == "file" and child.lower().endswith(AUDIO_EXTENSIONS):
                    url = _url_for(fs, child, source)
                    found[url] = SourceFile(url, int(info["size"]))
        else:
            found[source] = SourceFile(source, int(fs.size(path)))
    return [found[url] for url in sorted(found)]


def _walk_local(root: str) -> list[SourceFile]:
    """Audio files under ``root``, following symbolic links to files and to folders.

    Music libraries are often curated with links. A link that points back into a folder being
    walked (a loop), or to nothing, is listed with its problem instead of being followed.
    """
    listed: list[SourceFile] = []
    ancestors: list[tuple[int, int]] = []

    def walk(folder: str) -> None:
        info = os.stat(folder)
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            listed.append(SourceFile(folder, 0, f"symbolic link loop: {folder} leads back to "
                                                f"{os.path.realpath(folder)}; not followed"))
            return
        ancestors.append(key)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            try:
                is_dir = entry.is_dir()  # follows links
                size = None if is_dir else entry.stat().st_size
            except OSError as error:  # a broken link, or a link loop between files
                if entry.name.lower().endswith(AUDIO_EXTENSIONS) or entry.is_symlink():
                    target = os.readlink(entry.path) if entry.is_symlink() else "?"
                    listed.append(SourceFile(entry.path, 0, f"broken symbolic link to "
                                                           f"{target} ({error.strerror})"))
                continue
            if is_dir:
                walk(entry.path)
            elif entry.name.lower().endswith(AUDIO_EXTENSIONS) and entry.is_file():
                listed.append(SourceFile(entry.path, size))
        ancestors.pop()

    walk(root)
    return listed


def verified_sha256(path: str, *, trust_cache: bool = True) -> str:
    """sha256 of the local file ``path``, remembered by size, mtime, inode and ctime.

    The cache (``cache_root()/verified-sha256.json``) lets a re-run skip re-hashing files that
    have not changed. Any write through the file system changes the ctime, which ``utime``
    cannot set back, and a copy put in its place (``cp -p``, ``rsync -a``) has another inode,
    so either is hashed again even with its old mtime. What the cache cannot see is a change
    below the file system (bit rot on the disk): ``trust_cache=False`` hashes regardless.
    """
    known = _verified_cache()
    entry = known.get(os.path.realpath(path))
    if trust_cache and entry and entry[:-1] == _stamp(path):
        return entry[-1]
    digest = sha256_of(path)
    remember_sha256(path, digest)
    return digest


def remember_sha256(path: str, digest: str) -> None:
    """Note that the local file ``path``, as it is now, hashes to ``digest`` (which the caller
    has just computed from its bytes), for :func:`verified_sha256`."""
    known = _verified_cache()
    known[os.path.realpath(path)] = [*_stamp(path), digest]
    try:
        write_json_atomic(os.path.join(cache_root(), _VERIFIED_NAME), known)
    except OSError:  # a read-only home is no reason to stop; the next run hashes again
        pass


_VERIFIED_NAME = "verified-sha256.json"


def _stamp(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def _verified_cache() -> dict[str, list]:
    try:
        with open(os.path.join(cache_root(), _VERIFIED_NAME), encoding="utf-8") as handle:
            known = json.load(handle)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def sha256_of(url: str) -> str:
    """Stream the file at ``url`` through sha256."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
        return handle.read()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def dumps_json(data: Any) -> bytes:
    """Canonical JSON: sorted keys, fixed indentation, so equal data gives equal bytes."""
    return (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


class Staged:
    """A file (or folder) built under a temporary local name and published at ``url`` whole.

    The one way rainforest writes anything a reader may see. Locally the staging path is a
    hidden name beside ``url`` and :meth:`commit` is a rename on one filesystem (after an
    fsync); for an object store it is a local temporary file and the commit is one upload,
    since S3 shows an object only once its upload completes. :meth:`abort` removes it.
    Used as a context manager it yields the staging path, commits on success and aborts on
    any exception, Ctrl-C included::

        with storage.Staged(url) as path:
            write_the_file(path)

    A folder (``folder=True``) on an object store is uploaded under a hidden temporary prefix
    beside ``url``, then copied object by object to ``url`` (replacing what was there), the
    file named ``marker`` last, and the temporary prefix is removed. A reader that looks for
    the marker never sees the folder half copied.
    """

    def __init__(self, url: str, *, folder: bool = False, marker: str | None = None) -> None:
        self.url, self.folder, self.marker = url, folder, marker
        self.name = f".{posixpath.basename(url.rstrip('/'))}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"
        if is_remote(url):
            directory = tempfile.gettempdir()
        else:
            directory = os.path.dirname(os.path.abspath(url))
            os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.name)
        if folder:
            os.mkdir(self.path)

    def commit(self) -> None:
        try:
            if is_remote(self.url):
                fs, path = filesystem(self.url)
                if self.folder:
                    self._publish_folder(fs, path.rstrip("/"))
                else:
                    fs.put_file(self.path, path)
            elif self.folder:
                if os.path.isdir(self.url):
                    discard(self.url)
                os.rename(self.path, self.url)
            else:
                _fsync(self.path)
                os.replace(self.path, self.url)
        finally:
            self.abort()

    def _publish_folder(self, fs, final: str) -> None:
        temporary = posixpath.join(posixpath.dirname(final), self.name)
        names = sorted(os.path.relpath(os.path.join(root, name), self.path)
                       for root, _, files in os.walk(self.path) for name in files)
        try:
            for name in names:
                fs.put_file(os.path.join(self.path, name), posixpath.join(temporary, name))
            if fs.exists(final):
                fs.rm(final, recursive=True)
            for name in sorted(names, key=lambda name: name == self.marker):
                fs.copy(posixpath.join(temporary, name), posixpath.join(final, name))
        finally:
            if fs.exists(temporary):
                fs.rm(temporary, recursive=True)
            fs.invalidate_cache()

    def abort(self) -> None:
        if self.folder:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _remove_quietly(self.path)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def discard(folder: str, *, marker: str | None = None) -> None:
    """Delete a folder so that no reader ever sees it half deleted.

    Locally it is renamed to a staging name first: a process killed part way through the
    deletion leaves a hidden staging folder (which readers ignore and
    :func:`remove_stale_staging` removes). An object store cannot rename a prefix, so the
    ``marker`` file that makes the folder count (see :class:`Staged`) goes first.
    """
    if is_remote(folder):
        if marker:
            remove_tree(join(folder, marker))
        remove_tree(folder)
        return
    doomed = f"{folder.rstrip('/')}{TEMP_MARKER}discard-{uuid.uuid4().hex[:12]}"
    doomed = os.path.join(os.path.dirname(doomed), "." + os.path.basename(doomed))
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that ``url`` shows either its old content or all of the new."""
    with Staged(url) as path, open(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(url: str, data: Any) -> None:
    write_bytes_atomic(url, dumps_json(data))


def list_names(url: str) -> list[str]:
    """Base names of the files and folders directly under ``url`` (empty if it does not exist)."""
    fs, path = filesystem(url)
    if is_remote(url):
        fs.invalidate_cache(path)  # another process may have written since the last listing
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove_tree(url: str) -> None:
    """Delete the file or folder (or object prefix) at ``url``, if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if is_remote(url):
        fs.invalidate_cache()


def remove_stale_staging(url: str) -> int:
    """Delete the temporary files, folders or prefixes a killed run left directly under
    ``url`` (a local folder or an object store prefix); returns how many."""
    stale = [name for name in list_names(url) if name.startswith(".") and TEMP_MARKER in name]
    for name in stale:
        remove_tree(join(url, name))
    return len(stale)


def download_folder(url: str, directory: str) -> None:
    """Copy every file under the folder or prefix ``url`` into the local ``directory``."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    for remote in fs.find(path):
        local = os.path.join(directory, *posixpath.relpath(remote, path).split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)


def fetch_to_local(url: str, directory: str) -> str:
    """A local path holding the content of ``url``: the path itself, or a downloaded copy."""
    if not is_remote(url):
        return url
    fs, path = filesystem(url)
    local = os.path.join(directory, uuid.uuid4().hex + os.path.splitext(path)[1])
    fs.get_file(path, local)
    return local


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
