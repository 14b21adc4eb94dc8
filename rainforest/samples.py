"""Real music for demos, tests and benchmarks, fetched by Debian package name.

Debian ships freely licensed game soundtracks as ordinary packages, so ``apt-get download``
gets real songs from a mirror with checksums, and ``dpkg -x`` unpacks them without installing
anything (only ``apt-get update`` needs root). Songs land in a cache outside git:
``$RAINFOREST_CACHE`` if set, else ``~/.cache/rainforest``.

Useful packages: ``wesnoth-1.16-music`` (41 Ogg Vorbis tracks, about 2 hours, GPL-2+, 153 MB)
and ``asc-music`` (3 mp3 tracks, 10 MB).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import soundfile

from rainforest import storage
from rainforest.errors import ParameterError, RainforestError
from rainforest.storage import AUDIO_EXTENSIONS, TEMP_MARKER, cache_root

#: The package :func:`debian_music` fetches when none is named.
DEFAULT_PACKAGE = "wesnoth-1.16-music"

#: Sample rates the mp3 encoder accepts.
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

# Written last into an extracted package; a folder without it is not trusted.
_MARKER = ".rainforest-complete.json"
# Debian policy: lower case letters, digits, + - . ; at least two characters.
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_APT_TIMEOUT_S = 3600
_MP3_BLOCK_FRAMES = 1 << 16


def debian_music(package: str = DEFAULT_PACKAGE, *,
                 cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Download a Debian package of music once and return its audio files, sorted.

    The first call runs ``apt-get download PACKAGE`` (and, if the package lists are missing
    or stale, ``apt-get update`` once, through ``sudo -n`` when not root), unpacks the
    ``.deb`` with ``dpkg -x`` into ``CACHE/debian/PACKAGE/`` and marks it complete. Later
    calls read the cache and run nothing.

    Parameters
    ----------
    package : str
        A Debian binary package name, e.g. ``"wesnoth-1.16-music"`` or ``"asc-music"``.
    cache_dir : str or path-like, optional
        Cache folder; by default ``$RAINFOREST_CACHE`` or ``~/.cache/rainforest``.

    Returns
    -------
    list of pathlib.Path
        The package's ``.ogg``, ``.mp3``, ``.flac`` and ``.wav`` files, sorted by path.

    Raises
    ------
    ParameterError
        ``package`` is not a valid Debian package name.
    RainforestError
        apt-get or dpkg is missing, the download failed, or the package holds no audio.

    Examples
    --------
    >>> songs = debian_music("wesnoth-1.16-music")   # doctest: +SKIP
    >>> len(songs), songs[0].suffix                    # doctest: +SKIP
    (41, '.ogg')
    """
    if not isinstance(package, str) or not _PACKAGE_NAME.match(package):
        raise ParameterError(f"not a Debian package name: {package!r}")
    base = cache_root(cache_dir) / "debian"
    target = base / package
    if (target / _MARKER).is_file():
        return _music_files(target)

    _require("apt-get")
    _require("dpkg")
    base.mkdir(parents=True, exist_ok=True)
    # The work folder sits beside the target, so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{package}{TEMP_MARKER}", dir=base) as work:
        work = Path(work)
        downloads = work / "deb"
        downloads.mkdir()
        started = time.monotonic()
        deb = _apt_download(package, downloads)
        extracted = work / "root"
        _run(["dpkg", "-x", str(deb), str(extracted)],
             f"dpkg -x could not unpack {deb.name}; the download may be corrupt (it was "
             "discarded), so try again")
        files = _music_files(extracted)
        if not files:
            raise RainforestError(
                f"Debian package {package!r} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}); "
                f"pick a music package (for example {DEFAULT_PACKAGE!r})"
            )
        marker = {"package": package, "deb": deb.name, "files": len(files),
                  "seconds": round(time.monotonic() - started, 1)}
        (extracted / _MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if target.exists():
            # Left by an interrupted run (no marker), or just finished by a concurrent one.
            if (target / _MARKER).is_file():
                return _music_files(target)
            shutil.rmtree(target)
        try:
            os.rename(extracted, target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
    return _music_files(target)


def mp3_copies(paths: Iterable[str | os.PathLike], *, out_dir: str | os.PathLike,
               limit: int | None = None) -> list[Path]:
    """Write mp3 versions of songs (e.g. the Ogg tracks of :func:`debian_music`), cached.

    Each song is streamed through soundfile's mp3 encoder in blocks, so memory does not grow
    with its length. An mp3 is written under a temporary name and renamed when finished, so an
    existing ``OUT_DIR/NAME.mp3`` is complete and is reused as it is.

    Parameters
    ----------
    paths : iterable of str or path-like
        Songs soundfile can read, with 1 or 2 channels at an mp3 sample rate (up to 48 kHz).
    out_dir : str or path-like
        Folder for ``<stem>.mp3``; created if missing.
    limit : int, optional
        Convert only the first ``limit`` songs.

    Returns
    -------
    list of pathlib.Path
        One mp3 per converted song, in the order given.

    Examples
    --------
    >>> songs = debian_music("wesnoth-1.16-music")              # doctest: +SKIP
    >>> mp3_copies(songs, out_dir="/tmp/mp3", limit=2)          # doctest: +SKIP
    [PosixPath('/tmp/mp3/battle-epic.mp3'), PosixPath('/tmp/mp3/breaking_the_chains.mp3')]
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ParameterError(f"limit must be a non-negative integer or None, got {limit!r}")
    sources = [Path(p) for p in paths]
    if limit is not None:
        sources = sources[:limit]
    stems = [p.stem for p in sources]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ParameterError(f"songs would share an mp3 name: {', '.join(repeated)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_mp3_copy(source, out / f"{source.stem}.mp3") for source in sources]


def _mp3_copy(source: Path, target: Path) -> Path:
    if target.is_file():
        return target
    try:
        with soundfile.SoundFile(str(source)) as song:
            if song.samplerate not in MP3_RATES or song.channels not in (1, 2):
                raise RainforestError(
                    f"{source}: mp3 needs 1 or 2 channels at one of {MP3_RATES} Hz, "
                    f"not {song.channels} channels at {song.samplerate} Hz"
                )
            with storage.Staged(str(target)) as staging, soundfile.SoundFile(
                    staging, "w", samplerate=song.samplerate, channels=song.channels,
                    format="MP3", subtype="MPEG_LAYER_III") as mp3:
                for block in song.blocks(blocksize=_MP3_BLOCK_FRAMES, dtype="float32",
                                         always_2d=True):
                    mp3.write(block)
    except soundfile.LibsndfileError as error:
        raise RainforestError(f"{source}: cannot convert to mp3 ({error})") from None
    return target


def _music_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.name.lower().endswith(AUDIO_EXTENSIONS) and p.is_file())


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise RainforestError(
            f"{tool} not found: fetching music by Debian package name needs a Debian or "
            "Ubuntu system with apt-get and dpkg. Elsewhere, download the .deb from "
            "https://packages.debian.org, unpack it with `ar x` and `tar xf data.tar.*`, and "
            "pass the audio files directly."
        )


def _apt_download(package: str, folder: Path) -> Path:
    """``apt-get download`` into ``folder``, refreshing the package lists once if needed."""
    command = ["apt-get", "download", "-q", package]
    result = _apt(command, folder)
    if result.returncode != 0:
        # "Unable to locate package" (no lists yet) and "404 Not Found" (a newer version
        # replaced the one in stale lists) are both cured by fresh lists.
        _apt_update()
        result = _apt(command, folder)
    if result.returncode != 0:
        raise RainforestError(
            f"apt-get download {package} failed (exit {result.returncode}): "
            f"{_tail(result.stderr)}. Check the name with `apt-cache policy {package}` and "
            "that a Debian mirror is reachable."
        )
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise RainforestError(f"apt-get download {package} left {len(debs)} .deb files "
                              f"in {folder}, expected 1")
    return debs[0]


def _apt_update() -> None:
    command = ["apt-get", "update", "-q"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RainforestError(
                "the apt package lists are missing or stale and updating them needs root: "
                "run `sudo apt-get update`, then try again"
            )
        command = ["sudo", "-n", *command]  # never prompt for a password mid-download
    result = _apt(command, None)
    if result.returncode != 0:
        raise RainforestError(
            f"`{' '.join(command)}` failed (exit {result.returncode}): "
            f"{_tail(result.stderr)}. Run `sudo apt-get update` yourself, then try again."
        )


def _apt(command: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=_APT_TIMEOUT_S, env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise RainforestError(f"`{' '.join(command)}` took over {_APT_TIMEOUT_S} s; "
                              "check the network and the Debian mirror") from None


def _run(command: list[str], advice: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RainforestError(f"{advice} ({_tail(result.stderr)})")


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no message"
