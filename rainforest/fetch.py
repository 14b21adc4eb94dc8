"""Songs from URLs, CSV metadata or ``s3://`` into a folder or prefix, politely and resumably.

The stage before ``preprocess``::

    rainforest fetch urls.txt --out songs/
    rainforest fetch tracks.csv --label-column track.genre_top --out s3://bucket/songs/ \
        --url-template 'https://host/{track_id:06d[:3]}/{track_id:06d}.mp3'

How it behaves:

- **Polite:** one shared limit per host (``rate`` request starts per second, at most
  ``concurrency`` downloads at once), retries with exponential backoff and jitter, a
  ``Retry-After`` on 429 and 503 pauses the whole host, and a User-Agent naming rainforest.
  One urllib3 connection pool serves the run, so a host's files reuse its connections;
  urllib3 follows redirects and retries failed connections, and every other retry is made
  here, through the host's limit.
- **Names before requests:** every source's output name is decided from its URL before anything
  is downloaded (sanitised, made unique), and kept in ``fetch.json``. A name that depended on a
  response (``Content-Disposition``) could not be known by a resumed run, which would then save
  the same song twice; the header's sanitised name is recorded as ``remote_name`` instead.
- **Resumable:** a source whose recorded file is present with the recorded size and sha256 (or,
  for ``s3://`` sources, the same ETag) is skipped. ``fetch.json`` is rewritten as downloads
  finish, so a killed run continues where it stopped.
- **Atomic:** each file is built under a temporary name (:mod:`rainforest.storage`'s staging)
  and renamed, or uploaded in one piece; an S3-to-S3 copy is one server-side copy.
- **Safe:** http, https and s3 only (redirects too, at most 10); TLS verified; a size cap
  checked against Content-Length and while streaming; an HTML or JSON page under an audio
  name is a recorded failure, not a song.
"""

from __future__ import annotations

import contextlib
import csv
import email.message
import email.utils
import hashlib
import io
import os
import random
import re
import ssl
import string
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import urllib3

from rainforest import __version__, storage
from rainforest.audio import sniff_reason
from rainforest.config import Config, documented, setting
from rainforest.dataset import MANIFEST_NAME as DATASET_MANIFEST_NAME
from rainforest.dataset import PLAN_NAME
from rainforest.documents import (
    LIST,
    NAME,
    NATURAL,
    OPTIONAL_SHA256,
    OPTIONAL_TEXT,
    TEXT,
    Kind,
    check_fields,
    is_plain_name,
    read_document,
)
from rainforest.errors import DatasetFormatError, ParameterError, RainforestError

FETCH_FORMAT = "rainforest-fetch"
VERSION = 1
FETCH_NAME = "fetch.json"
SCHEMES = ("http", "https", "s3")
USER_AGENT = (f"rainforest/{__version__} (WaveNet song-dataset fetcher; polite: rate-limited, "
              "honours Retry-After)")

_CHUNK = 1 << 16
_MAX_NAME = 120  # bytes: well under every filesystem's 255, with room for a hash suffix
_RESERVED_NAMES = {FETCH_NAME, DATASET_MANIFEST_NAME, PLAN_NAME}
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MAX_REDIRECTS = 10
# Every fetch.json entry has every field; a failure leaves what it never learned as null.
_EMPTY_ENTRY = {"bytes": None, "sha256": None, "etag": None, "final_url": None,
                "content_type": None, "remote_name": None}


@documented
@dataclass(frozen=True)
class FetchConfig(Config):
    """How politely and how safely to fetch."""

    rate: float = setting(2.0, "request starts per second per host (0: unlimited)")
    concurrency: int = setting(4, "downloads in flight at once")
    max_bytes: int = setting(4 << 30, "largest file accepted, checked against Content-Length "
                             "and while streaming")
    retries: int = setting(4, "retries after a failed attempt (timeouts, 429, 5xx, cut-short "
                           "bodies)")
    timeout: float = setting(60.0, "seconds a server may stay silent before an attempt fails")
    backoff: float = setting(1.0, "first retry delay in seconds; doubled each retry, with "
                             "jitter")
    max_backoff: float = setting(300.0, "longest delay between retries, Retry-After included; "
                                 "a server that asks for longer is a recorded failure")

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ParameterError(f"rate must be >= 0 requests/s, got {self.rate}")
        if self.concurrency < 1:
            raise ParameterError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_bytes < 1:
            raise ParameterError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.retries < 0:
            raise ParameterError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ParameterError("timeout must be > 0 and backoff, max_backoff >= 0")


@dataclass(frozen=True)
class Source:
    """One thing to fetch: its URL and the labels its metadata row gave it."""

    url: str
    labels: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- sources


class _TemplateFormatter(string.Formatter):
    """``str.format`` with integers parsed from CSV text and a trailing slice in the spec.

    ``{track_id:06d[:3]}`` formats the id as six digits and keeps the first three: the FMA's
    folder layout ``000/000002.mp3``.
    """

    _SLICE = re.compile(r"^(.*)\[(-?\d*):(-?\d*)\]$")

    def format_field(self, value: Any, format_spec: str) -> str:
        match = self._SLICE.match(format_spec)
        if match:
            text = super().format_field(value, match.group(1))
            start, stop = (int(g) if g else None for g in match.group(2, 3))
            return text[start:stop]
        return super().format_field(value, format_spec)


def _template_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def fill_template(template: str, row: dict[str, str]) -> str:
    """The URL for one CSV row; fields are column names (``{track_id:06d}``).

    Examples
    --------
    >>> fill_template("https://h/{track_id:06d[:3]}/{track_id:06d}.mp3", {"track_id": "2"})
    'https://h/000/000002.mp3'
    """
    values = {name: _template_value(value) for name, value in row.items()}
    try:
        return _TemplateFormatter().vformat(template, (), values)
    except KeyError as error:
        raise ParameterError(
            f"--url-template names column {error.args[0]!r}, which the CSV does not have; "
            f"columns: {', '.join(sorted(row))}"
        ) from None
    except (ValueError, IndexError, AttributeError, TypeError) as error:  # {a.b}, {a[0]}
        raise ParameterError(f"--url-template {template!r} does not fit row {row}: {error}") \
            from None


def _is_multilevel_header(rows: list[list[str]]) -> bool:
    # pandas writes MultiIndex columns as one row per level, each starting with an empty cell
    # (the index column), then a row holding only the index name.
    return (len(rows) >= 3 and rows[0][:1] == [""] and rows[1][:1] == [""]
            and bool(rows[2][:1]) and rows[2][0] != "" and not any(rows[2][1:]))


def read_csv_table(text: str) -> list[dict[str, str]]:
    """Rows of a CSV as dicts, with a two-level header flattened to ``group.column``.

    Handles a flat header (one row of names) and the FMA's ``tracks.csv`` layout (a row of
    groups, a row of names, a row with the index name), where ``('track', 'genre_top')``
    becomes ``track.genre_top`` and the index column ``track_id``.

    Examples
    --------
    >>> read_csv_table(",track,artist\\n,genre_top,name\\ntrack_id,,\\n2,Hip-Hop,AWOL\\n")
    [{'track_id': '2', 'track.genre_top': 'Hip-Hop', 'artist.name': 'AWOL'}]
    """
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        return []
    if _is_multilevel_header(rows):
        groups, names = rows[0], rows[1]
        filled, current = [], ""
        for group in groups:  # a blank group cell continues the group on its left
            current = group or current
            filled.append(current)
        header = [rows[2][0]] + [
            f"{g}.{n}" if g and n else (g or n) for g, n in zip(filled[1:], names[1:],
                                                                 strict=False)]
        body = rows[3:]
    else:
        header, body = rows[0], rows[1:]
    header = [name.strip() for name in header]
    return [dict(zip(header, row + [""] * (len(header) - len(row)), strict=False))
            for row in body]


def _column(rows: list[dict[str, str]], name: str, flag: str, where: str) -> str:
    if rows and name not in rows[0]:
        close = [c for c in rows[0] if name.lower() in c.lower()] or sorted(rows[0])[:20]
        raise ParameterError(f"{where} has no column {name!r} (for {flag}); did you mean one "
                             f"of: {', '.join(close)}?")
    return name


def read_csv_file(where: str) -> list[dict[str, str]]:
    """:func:`read_csv_table` of the file at ``where``, which must be UTF-8 CSV."""
    try:
        return read_csv_table(storage.read_bytes(where).decode("utf-8-sig"))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ParameterError(f"{where} cannot be read as a UTF-8 CSV file ({error}); save it "
                             "as CSV in UTF-8") from None


def _csv_sources(where: str, *, url_column: str | None, url_template: str | None,
                 label_columns: Sequence[str]) -> list[Source]:
    rows = read_csv_file(where)
    if (url_column is None) == (url_template is None):
        raise ParameterError(f"{where} is a CSV: give exactly one of --url-column NAME or "
                             "--url-template 'https://host/{id_column}.mp3'")
    if url_column:
        _column(rows, url_column, "--url-column", where)
    for name in label_columns:
        _column(rows, name, "--label-column", where)
    found = []
    for row in rows:
        url = row[url_column].strip() if url_column else fill_template(url_template, row)
        if not url:
            continue
        labels = {name: row[name].strip() for name in label_columns if row[name].strip()}
        found.append(Source(url, labels))
    return found


def _text_sources(where: str) -> list[Source]:
    lines = storage.read_bytes(where).decode("utf-8-sig").splitlines()
    return [Source(line.strip()) for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def read_sources(sources: Iterable[str], *, url_column: str | None = None,
                 url_template: str | None = None,
                 label_columns: Sequence[str] = ()) -> list[Source]:
    """Expand the command line's sources into the list to fetch, repeats removed.

    Each source is an ``http(s)://`` URL, a ``.csv`` file of metadata, an ``s3://`` prefix
    (every audio file under it), or a text file of URLs (one per line, ``#`` comments).
    """
    found: dict[str, Source] = {}
    for where in sources:
        where = str(where)
        lower = where.lower()
        if lower.startswith(("http://", "https://")):
            listed = [Source(where)]
        elif lower.endswith((".csv", ".csv.txt")):
            listed = _csv_sources(where, url_column=url_column, url_template=url_template,
                                  label_columns=label_columns)
        elif lower.startswith("s3://") and not lower.endswith(".txt"):
            listed = [Source(s.url) for s in storage.list_sources([where])]
        else:
            if not storage.exists(where):
                raise ParameterError(f"no such source file: {where}")
            listed = _text_sources(where)
        for source in listed:
            found.setdefault(source.url, source)
    return list(found.values())


# ----------------------------------------------------------------------------- names


def safe_name(raw: str | None) -> str:
    """A file name that stays inside the output folder, whatever ``raw`` a server sent.

    Percent-decoding, then the last path component of ``/`` or ``\\``; control and unusual
    characters become ``_``; leading dots go (no hidden or staging names, no ``..``); the
    result is at most 120 bytes with its extension kept; empty becomes ``file``.

    Examples
    --------
    >>> safe_name("../../etc/x"), safe_name("/abs/path.mp3"), safe_name(""), safe_name("a%2Fb.ogg")
    ('x', 'path.mp3', 'file', 'b.ogg')
    """
    text = urllib.parse.unquote(raw or "")
    text = unicodedata.normalize("NFC", text).replace("\\", "/").split("/")[-1]
    text = "".join(c if (c.isalnum() or c in "._-+,()= ") and c.isprintable() else "_"
                   for c in text)
    text = text.strip(" ").lstrip(".").strip(" ")
    if not text or set(text) <= {"_", "."}:
        return "file"
    stem, ext = os.path.splitext(text)
    if len(ext.encode()) > 16:
        stem, ext = text, ""
    while len((stem + ext).encode()) > _MAX_NAME:
        stem = stem[:-1]
    return (stem.rstrip(" .") or "file") + ext


def content_disposition_name(header: str | None) -> str | None:
    """The sanitised file name a ``Content-Disposition`` header offers (RFC 6266), or None."""
    if not header:
        return None
    message = email.message.Message()
    message["content-disposition"] = header
    name = message.get_filename()
    return safe_name(name) if name is not None else None


def _name_from_url(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    return safe_name(path.rsplit("/", 1)[-1])


def plan_names(sources: Sequence[Source], previous: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Unique output names: a source keeps the name an earlier run recorded for it; a new
    source takes its URL's sanitised base name, with a hash of its URL when that is taken.

    Names are compared case-insensitively (macOS and Windows folders are).
    """
    names: dict[str, str] = {}
    taken = {name.casefold() for name in _RESERVED_NAMES}
    for source in sources:
        old = previous.get(source.url, {}).get("name")
        if is_plain_name(old) and old.casefold() not in taken:
            names[source.url] = old
            taken.add(old.casefold())
    for source in sources:
        if source.url in names:
            continue
        name = _name_from_url(source.url)
        stem, ext = os.path.splitext(name)
        # surrogatepass: a URL from the command line may carry undecodable bytes as surrogates
        tag = hashlib.sha256(source.url.encode(errors="surrogatepass")).hexdigest()[:10]
        number = 0
        while name.casefold() in taken:  # again: an earlier run gave another source this name
            number += 1
            suffix = f"-{tag}" if number == 1 else f"-{tag}-{number}"
            name = f"{stem[: _MAX_NAME - len(ext) - len(suffix)]}{suffix}{ext}"
        names[source.url] = name
        taken.add(name.casefold())
    return names


# ----------------------------------------------------------------------------- politeness


class HostLimiter:
    """Request starts per host at least ``1 / rate`` s apart, and host-wide pauses.

    Shared by all download threads. A ``Retry-After`` pauses the host for every thread, not
    just the one that was told.
    """

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = stop

    def acquire(self, host: str) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                start = self._next.get(host, now)
                if start <= now:
                    self._next[host] = now + self._interval
                    return
            self._stop.wait(start - now)
        raise KeyboardInterrupt

    def pause(self, host: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._next[host] = max(self._next.get(host, until), until)


class _Failure(RainforestError):
    """One attempt failed; ``retry`` says whether another attempt may help."""

    def __init__(self, reason: str, *, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry = retry
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _RetryPolicy(urllib3.util.Retry):
    """urllib3's retries, with two changes: a redirect to a scheme other than http or https is
    refused (urllib3 has no other scheme, but reports e.g. a ``file:`` target only as a URL
    without a host), and the backoff sleep ends as soon as the run is stopped."""

    stop = threading.Event()  # each run's policy carries the run's own (see _retry_policy)

    def new(self, **changes: Any) -> _RetryPolicy:
        fresh = super().new(**changes)
        fresh.stop = self.stop
        return fresh

    def increment(self, method: str | None = None, url: str | None = None,
                  response: Any = None, error: Exception | None = None, _pool: Any = None,
                  _stacktrace: Any = None) -> _RetryPolicy:
        location = response.get_redirect_location() if response is not None else None
        if location:
            scheme = urllib.parse.urlsplit(urllib.parse.urljoin(url or "", location)).scheme
            if scheme.lower() not in ("http", "https"):  # urllib3 then releases the response
                raise urllib3.exceptions.MaxRetryError(_pool, url, _Failure(
                    f"refused a redirect to {scheme!r} (only http and https are followed)",
                    retry=False))
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response: Any = None) -> None:
        if self.stop.wait(self.get_backoff_time()):
            raise KeyboardInterrupt


def _retry_policy(config: FetchConfig, stop: threading.Event) -> _RetryPolicy:
    """What urllib3 retries by itself: redirects (up to ``_MAX_REDIRECTS``) and connections
    that failed before any request was sent, with the settings' backoff.

    Everything the server answered, and every timeout or broken body, is returned to
    :func:`fetch_one`, whose retries wait for the host's limiter: a retried request is a
    request like any other, and a ``Retry-After`` must pause every thread on that host.
    """
    policy = _RetryPolicy(total=None, connect=config.retries, read=0, status=0, other=0,
                          redirect=_MAX_REDIRECTS, raise_on_redirect=True,
                          status_forcelist=(), respect_retry_after_header=False,
                          backoff_factor=config.backoff, backoff_max=config.max_backoff,
                          backoff_jitter=config.backoff)
    policy.stop = stop
    return policy


def _connection_pool(config: FetchConfig) -> urllib3.PoolManager:
    """One pool for the run, shared by the download threads, so the files of a host reuse its
    connections."""
    return urllib3.PoolManager(
        maxsize=config.concurrency,  # a connection per download thread is kept for each host
        headers={"User-Agent": USER_AGENT, "Accept": "*/*"},
        timeout=urllib3.Timeout(connect=config.timeout, read=config.timeout),
        ssl_context=ssl.create_default_context())  # certificate and host name verified


# ----------------------------------------------------------------------------- one file


def _sniff(path: str) -> None:
    reason = sniff_reason(path)
    if reason:
        raise _Failure(reason, retry=False)


def _http_failure(response: urllib3.BaseHTTPResponse) -> _Failure:
    status, reason = response.status, response.reason  # a 3xx here is one urllib3 can't follow
    wait_for = (parse_retry_after(response.headers.get("Retry-After"))
                if status in (429, 503) else None)
    return _Failure(f"HTTP {status} {reason}", retry=status in _RETRY_STATUS,
                    retry_after=wait_for)


def _network_failure(error: Exception, config: FetchConfig) -> _Failure:
    """A failure urllib3 raised, before or during the body, as a retried or final failure."""
    if isinstance(error, urllib3.exceptions.MaxRetryError):  # urllib3's own retries ran out
        error = error.reason
    if isinstance(error, _Failure):  # a redirect _RetryPolicy refused
        return error
    if isinstance(error, urllib3.exceptions.ResponseError):
        return _Failure(f"redirect loop or too many redirects (more than {_MAX_REDIRECTS})",
                        retry=False)
    cause = error.args[0] if error.args else None
    if isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError):
        return _Failure(f"TLS certificate not trusted: {cause}", retry=False)
    if isinstance(error, urllib3.exceptions.ReadTimeoutError):
        return _Failure("timed out: the server sent nothing for --timeout seconds", retry=True)
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):  # refused, unknown host too
        return _Failure(f"could not connect ({config.retries + 1} tries, with backoff): "
                        f"{error}", retry=False)
    return _Failure(f"network error: {error}", retry=True)


class _Job:
    """What a download thread needs besides the source: settings, limiter, the connection
    pool, progress."""

    def __init__(self, config: FetchConfig, limiter: HostLimiter, stop: threading.Event,
                 count_bytes: Callable[[int], None]) -> None:
        self.config, self.limiter, self.stop, self.count_bytes = (
            config, limiter, stop, count_bytes)
        self.pool = _connection_pool(config)
        self.retries = _retry_policy(config, stop)


def _stream_to(response, staging: str, job: _Job, declared: int | None) -> tuple[int, str]:
    digest, received = hashlib.sha256(), 0
    try:
        with open(staging, "wb") as out:
            while chunk := response.read(_CHUNK):
                if job.stop.is_set():
                    raise KeyboardInterrupt
                received += len(chunk)
                if received > job.config.max_bytes:
                    raise _Failure(f"too large: more than the {job.config.max_bytes:,}-byte "
                                   "cap (--max-bytes) while streaming", retry=False)
                digest.update(chunk)
                out.write(chunk)
                job.count_bytes(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    finally:
        job.count_bytes(-received)  # counted again below once the file is complete
    if declared is not None and received != declared:
        raise _Failure(f"cut short: got {received:,} of the {declared:,} bytes promised by "
                       "Content-Length", retry=True)
    job.count_bytes(received)
    return received, digest.hexdigest()


def _request(source: Source, job: _Job) -> urllib3.BaseHTTPResponse:
    """The response to GET ``source.url``, redirects followed, its body not yet read."""
    try:
        return job.pool.request("GET", source.url, retries=job.retries, preload_content=False,
                                decode_content=False,  # the bytes as sent, as Content-Length
                                enforce_content_length=False)  # _stream_to says what is short
    except urllib3.exceptions.HTTPError as error:
        raise _network_failure(error, job.config) from None


def _final_url(source: Source, response: urllib3.BaseHTTPResponse) -> str:
    redirects = [step for step in response.retries.history if step.redirect_location]
    if not redirects:
        return source.url
    return urllib.parse.urljoin(redirects[-1].url, redirects[-1].redirect_location)


def _release(response: urllib3.BaseHTTPResponse) -> None:
    """The connection back to the pool; closed first unless its body was read to the end
    (urllib3 lets go of it then), since an unread rest would spoil the next request."""
    if response.connection is not None:
        response.close()
    response.release_conn()


def _fetch_http_once(source: Source, staging: str, job: _Job) -> dict[str, Any]:
    response = _request(source, job)
    try:
        if not 200 <= response.status < 300:
            raise _http_failure(response)
        length = response.headers.get("Content-Length")
        declared = int(length) if length and length.strip().isdigit() else None
        if declared is not None and declared > job.config.max_bytes:
            raise _Failure(f"too large: Content-Length {declared:,} bytes is over the "
                           f"{job.config.max_bytes:,}-byte cap (--max-bytes)", retry=False)
        size, digest = _stream_to(response, staging, job, declared)
    except urllib3.exceptions.HTTPError as error:
        raise _network_failure(error, job.config) from None
    except OSError as error:  # urllib3 wraps its own: this one is the local file's
        raise _Failure(f"could not write the download: {error}", retry=True) from None
    finally:
        _release(response)
    _sniff(staging)
    return {"bytes": size, "sha256": digest, "final_url": _final_url(source, response),
            "etag": response.headers.get("ETag"),
            "content_type": response.headers.get("Content-Type"),
            "remote_name": content_disposition_name(response.headers.get("Content-Disposition"))}


@contextlib.contextmanager
def _s3_failures():
    """S3 errors as fetch failures: a missing object or a denial is final, the rest retried."""
    try:
        yield
    except FileNotFoundError:
        raise _Failure("no such object", retry=False) from None
    except PermissionError as error:
        raise _Failure(f"S3 access denied: {error}", retry=False) from None
    except OSError as error:
        raise _Failure(f"S3 error: {error}", retry=True) from None


def _s3_info(source: Source, job: _Job) -> tuple[Any, str, dict[str, Any]]:
    fs, path = storage.filesystem(source.url)
    with _s3_failures():
        info = fs.info(path)
    size = int(info.get("size") or 0)
    if size > job.config.max_bytes:
        raise _Failure(f"too large: {size:,} bytes is over the {job.config.max_bytes:,}-byte "
                       "cap (--max-bytes)", retry=False)
    return fs, path, {"bytes": size, "etag": info.get("ETag"), "final_url": source.url}


def _fetch_s3_once(source: Source, target: str, staging: str | None,
                   job: _Job) -> dict[str, Any]:
    fs, path, info = _s3_info(source, job)
    with _s3_failures():
        if staging is None:  # S3 to S3: sniff the head, then one server-side copy
            with tempfile.NamedTemporaryFile(prefix="rainforest-sniff-") as head:
                head.write(fs.cat_file(path, start=0, end=512))
                head.flush()
                _sniff(head.name)
            _, target_path = storage.filesystem(target)
            fs.copy(path, target_path)
            return {**info, "sha256": None}
        fs.get_file(path, staging)
    _sniff(staging)
    job.count_bytes(info["bytes"])
    return {**info, "sha256": storage.sha256_of(staging)}


def _retry_delay(failure: _Failure, attempt: int, config: FetchConfig) -> float:
    if failure.retry_after is not None:
        return failure.retry_after
    return min(config.max_backoff, config.backoff * 2 ** attempt * (0.5 + random.random()))


def _attempt(source: Source, target: str, job: _Job) -> dict[str, Any]:
    scheme = urllib.parse.urlsplit(source.url).scheme.lower()
    server_side = scheme == "s3" and storage.is_remote(target) and target.startswith("s3://")
    if server_side:
        return _fetch_s3_once(source, target, None, job)
    with storage.Staged(target) as staging:  # a failure raises, so nothing partial is kept
        if scheme == "s3":
            return _fetch_s3_once(source, target, staging, job)
        return _fetch_http_once(source, staging, job)


def fetch_one(source: Source, target: str, job: _Job) -> dict[str, Any]:
    """Fetch one source into ``target`` with retries; returns its ``fetch.json`` fields."""
    parts = urllib.parse.urlsplit(source.url)
    if parts.scheme.lower() not in SCHEMES:
        return {"status": "failed", "attempts": 0,
                "reason": f"unsupported scheme {parts.scheme or 'none'!r}: only "
                          f"{', '.join(SCHEMES)} are fetched"}
    host = parts.netloc.lower()
    for attempt in range(job.config.retries + 1):
        job.limiter.acquire(host)
        try:
            info = _attempt(source, target, job)
            return {"status": "ok", "attempts": attempt + 1, "reason": None, **info}
        except _Failure as failure:
            if not failure.retry or attempt == job.config.retries:
                return {"status": "failed", "attempts": attempt + 1, "reason": str(failure)}
            delay = _retry_delay(failure, attempt, job.config)
            if delay > job.config.max_backoff:
                return {"status": "failed", "attempts": attempt + 1,
                        "reason": f"{failure}; the server asked to wait {delay:.0f} s, longer "
                                  f"than the {job.config.max_backoff:.0f} s allowed"}
            if failure.retry_after is not None:
                job.limiter.pause(host, delay)  # the whole host waits, not just this thread
            elif job.stop.wait(delay):
                raise KeyboardInterrupt from None
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- the run


def read_fetch_manifest(out: str) -> dict[str, Any] | None:
    """The ``fetch.json`` in ``out``, checked, or None when there is none."""
    url = storage.join(out, FETCH_NAME)
    if not storage.exists(url):
        return None
    advice = "move it away to start a fresh fetch, or use another --out"
    data = read_document(url, kind=FETCH_FORMAT, version=VERSION, error=DatasetFormatError,
                         advice=advice, missing=f"no {FETCH_NAME} at {out}")
    check_fields(data, {"entries": LIST}, where=url, what="it", error=DatasetFormatError,
                 advice=advice)
    for index, entry in enumerate(data["entries"]):
        check_fields(entry, _ENTRY, where=url, what=f"entry {index}", error=DatasetFormatError,
                     advice=advice)
    return data


# What a resumed fetch and `preprocess --labels fetch` use of each entry. A name is where the
# file is written, so it must stay in the folder.
_ENTRY = {"source": TEXT, "name": NAME, "status": TEXT, "sha256": OPTIONAL_SHA256,
          "etag": OPTIONAL_TEXT,
          "bytes": Kind("a whole number or null", lambda v: v is None or NATURAL.test(v)),
          "labels": Kind("an object of strings", lambda v: type(v) is dict
                         and all(type(label) is str for label in v.values()))}


def _already_fetched(entry: dict[str, Any] | None, target: str, source: Source) -> bool:
    """Whether ``target`` still holds what ``entry`` recorded (size and sha256, or ETag)."""
    if not entry or entry.get("status") != "ok":
        return False
    fs, path = storage.filesystem(target)
    try:
        if int(fs.size(path)) != entry["bytes"]:
            return False
    except (FileNotFoundError, OSError):
        return False
    if entry.get("sha256"):
        return storage.sha256_of(target) == entry["sha256"]
    if source.url.startswith("s3://"):  # an S3-to-S3 copy: the source's ETag must match
        src_fs, src_path = storage.filesystem(source.url)
        return src_fs.info(src_path).get("ETag") == entry.get("etag")
    return False


def _write_manifest(out: str, entries: dict[str, dict[str, Any]], config: FetchConfig) -> None:
    storage.write_json_atomic(storage.join(out, FETCH_NAME), {
        "format": FETCH_FORMAT, "version": VERSION, "user_agent": USER_AGENT,
        "settings": asdict(config),
        "entries": [entries[url] for url in sorted(entries)],
    })


def fetch(sources: Sequence[Source], out: str, *, config: FetchConfig | None = None,
          progress: bool = True, save_every: float = 1.0,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fetch ``sources`` into ``out`` (a folder or ``s3://`` prefix) and record ``fetch.json``.

    Parameters
    ----------
    sources : sequence of Source
        From :func:`read_sources`.
    out : str
        Output folder or prefix; an earlier fetch there is resumed.
    config : FetchConfig, optional
    progress : bool
        Show progress bars (files and bytes).
    save_every : float
        Seconds between rewrites of ``fetch.json`` while downloads finish.
    log : callable
        Where status lines go.

    Returns
    -------
    dict
        The run's summary: fetched, skipped, failed (with reasons), bytes and seconds.

    Examples
    --------
    >>> fetch(read_sources(["urls.txt"]), "songs/")     # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    config = config or FetchConfig()
    out = storage.canonical(out)
    started = time.monotonic()
    unique: dict[str, Source] = {}
    for source in sources:  # one download per URL, the first row's labels
        unique.setdefault(source.url, source)
    sources = list(unique.values())
    previous = read_fetch_manifest(out) or {"entries": []}
    entries = {e["source"]: e for e in previous["entries"]}
    names = plan_names(sources, entries)
    storage.remove_stale_staging(out)  # temporaries a killed run left behind
    pending = _pending(sources, out, names, entries)
    skipped = len(sources) - len(pending)
    if skipped:
        log(f"resuming: {skipped} file(s) already fetched, {len(pending)} to go")

    stop = threading.Event()
    files_bar = tqdm(total=len(pending), desc="fetch", unit="file", disable=not progress,
                     dynamic_ncols=True, position=0)
    bytes_bar = tqdm(desc="bytes", unit="B", unit_scale=True,
                     disable=not progress, dynamic_ncols=True, position=1)
    job = _Job(config, HostLimiter(config.rate, stop), stop, bytes_bar.update)

    def record(source: Source, result: dict[str, Any]) -> None:
        entries[source.url] = {"source": source.url, "name": names[source.url],
                               "labels": source.labels, **_EMPTY_ENTRY, **result}
        files_bar.update(1)

    try:
        _download_all(pending, job, record, save=lambda: _write_manifest(out, entries, config),
                      save_every=save_every)
    finally:
        job.pool.clear()  # close the connections kept for reuse
        files_bar.close()
        bytes_bar.close()
        _write_manifest(out, entries, config)
    done = [entries[source.url] for source, _ in pending]
    fetched = [e for e in done if e["status"] == "ok"]
    failures = [{"source": e["source"], "reason": e["reason"]} for e in done
                if e["status"] == "failed"]
    return {
        "out": out, "sources": len(sources), "fetched": len(fetched), "skipped": skipped,
        "failed": len(failures), "failures": failures,
        "bytes": sum(e["bytes"] for e in fetched),
        "elapsed_seconds": time.monotonic() - started,
        "manifest": storage.join(out, FETCH_NAME),
    }


def _pending(sources: Sequence[Source], out: str, names: dict[str, str],
             entries: dict[str, dict[str, Any]]) -> list[tuple[Source, str]]:
    """(source, target) of every source not already fetched; refreshes kept entries' labels."""
    pending = []
    for source in sources:
        target = storage.join(out, names[source.url])
        if _already_fetched(entries.get(source.url), target, source):
            entries[source.url]["labels"] = source.labels
        else:
            pending.append((source, target))
    return pending


def _download_all(pending: list[tuple[Source, str]], job: _Job,
                  record: Callable[[Source, dict[str, Any]], None], *,
                  save: Callable[[], None], save_every: float) -> None:
    """Run :func:`fetch_one` over ``pending`` on ``job.config.concurrency`` threads.

    Results are recorded as they finish and saved at most every ``save_every`` seconds, and
    no later than about ``save_every`` seconds after they finish. Any
    exception here (Ctrl-C) stops every thread at its next chunk or wait, then propagates.
    """
    last_save, unsaved = time.monotonic(), False
    with ThreadPoolExecutor(max_workers=job.config.concurrency,
                            thread_name_prefix="fetch") as pool:
        futures = {pool.submit(fetch_one, source, target, job): source
                   for source, target in pending}
        try:
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, timeout=save_every,
                                       return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        result = future.result()
                    except Exception as error:  # a bug must not cost the other files
                        result = {"status": "failed", "attempts": None, "reason":
                                  f"internal error ({type(error).__name__}): {error}; "
                                  "please report it"}
                    record(futures[future], result)
                    unsaved = True
                # On the timer, not only when a file finishes: a finished file's record
                # must not wait in memory while long downloads go on.
                if unsaved and time.monotonic() - last_save >= save_every:
                    save()
                    last_save, unsaved = time.monotonic(), False
        except BaseException:
            job.stop.set()
            for future in futures:
                future.cancel()
            raise


def labels_by_file(out: str, column: str | None = None) -> dict[str, str]:
    """File name -> label from the ``fetch.json`` in ``out`` (for ``preprocess``).

    ``column`` picks one label column; without it, the only column recorded is used.
    """
    data = read_fetch_manifest(out)
    if data is None:
        return {}
    columns = sorted({c for e in data["entries"] for c in e.get("labels", {})})
    if column is None:
        if len(columns) > 1:
            raise ParameterError(f"{out}/{FETCH_NAME} records labels {columns}; choose one "
                                 "with --labels fetch:COLUMN")
        column = columns[0] if columns else None
    elif column not in columns:
        raise ParameterError(f"{out}/{FETCH_NAME} has no label column {column!r}; it has "
                             f"{columns or 'none'}")
    return {e["name"]: e["labels"][column] for e in data["entries"]
            if e.get("status") == "ok" and column in e.get("labels", {})}


__all__ = ["FetchConfig", "HostLimiter", "Source", "fetch", "fetch_one", "fill_template",
           "labels_by_file", "parse_retry_after", "plan_names", "read_csv_table",
           "read_fetch_manifest", "read_sources", "safe_name"]


if __name__ == "__main__":  # python -m rainforest.fetch ARGS is rainforest fetch ARGS
    from rainforest.cli import run_stage

    run_stage("fetch")
