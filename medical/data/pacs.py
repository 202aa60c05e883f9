"""A PACS as a site's data source: pull the instances a label CSV names over DICOMweb into a checksummed cache in
the site's workspace, then hand the rest of medsilo an ordinary manifest of local files.

A site dataset with ``pacs:`` instead of ``manifest:`` (:class:`medsilo.config.site.PacsSource`) names the
hospital's research PACS (its DICOMweb root) and a **label CSV**::

    study_uid,series_uid,sop_uid,label,patient_id,split
    1.2.826.0.1.3680043.8.498.1,1.2.826.0.1.3680043.8.498.2,1.2.826.0.1.3680043.8.498.3,pneumonia,P001,train
    1.2.826.0.1.3680043.8.498.4,,,normal,P002,val

``study_uid`` (StudyInstanceUID) is required. ``series_uid`` (SeriesInstanceUID) and ``sop_uid`` (SOPInstanceUID)
narrow a row to one series or one instance; a blank one widens it (the row's label then applies to every
instance of that series or study, found with QIDO-RS). Every other column is a manifest column
(:mod:`medsilo.config.manifest`: ``label``, ``patient_id``, ``split``, or a multi-label job's label columns) and
is copied as it is. An instance named by two rows is an error.

:func:`pull` then, for the dataset's cache folder ``<cache>/<site>/<dataset>/``:

1. resolves the rows to instances (QIDO-RS ``search_for_instances`` where a UID is blank);
2. verifies every cached file against the SHA-256 recorded in ``index.json`` when it was written; a file that
   is missing, unrecorded or changed is fetched again, and cached files no row names any more are removed;
3. fetches the missing instances with WADO-RS (``dicomweb-client``'s ``retrieve_instance``, in the transfer
   syntax the PACS stores) into ``instances/<SOPInstanceUID>.dcm``, each written whole or not at all
   (:mod:`medsilo.fs`), recording its digest as it goes, so an interrupted pull resumes where it stopped;
   the cache never grows past ``max_cache_mb`` (the pull stops with an error naming the setting first);
4. writes ``manifest.csv`` (``path`` plus the label CSV's other columns) beside ``instances/``.

The readers then read the files exactly like a folder of DICOMs, de-identification check included.
Credentials come from the site config's ``password_env`` / ``password_file`` (:func:`password`), never from
a job. A refused password (HTTP 401/403), an unreachable PACS and a missing instance (HTTP 404) each raise one
:class:`PacsError` line naming the endpoint (never the password) and what to do. Logs and messages carry
counts, label-CSV line numbers and the endpoint, never UIDs or patient IDs.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from medsilo.config.site import DatasetRef, PacsSource
from medsilo.errors import DataError
from medsilo.fs import atomic_open, write_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")

UID_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "sop_uid")
"""Columns of the label CSV that name DICOM objects; the rest are manifest columns."""
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""A DICOM UID (PS3.5 §9.1): digits and dots, at most 64 characters. Cached files are named by SOP Instance UID,
so this also keeps every cache path inside the cache."""
INSTANCES, INDEX, MANIFEST = "instances", "index.json", "manifest.csv"
TAG_STUDY, TAG_SERIES, TAG_SOP = "0020000D", "0020000E", "00080018"
MB = 1_000_000
PRIVATE = 0o600
"""Mode of every file the cache holds (instances, index, manifest): readable by the site user only."""
MAX_MATCHES = 100_000
"""Most instances one label-CSV row may match (a study of chest X-rays holds a handful)."""
RETRIES = 3
"""Attempts per DICOMweb request (back-off 1 s, then 2 s)."""


class PacsError(DataError):
    """A PACS dataset that cannot be pulled; the message names the endpoint or the label CSV line, never a
    password or a UID."""


@dataclass(frozen=True)
class Instance:
    """One instance a label-CSV row asks for: its UIDs, the row's line and its manifest cells."""

    study: str
    series: str
    sop: str
    line: int
    cells: tuple[str, ...]


@dataclass(frozen=True)
class PullReport:
    """What :func:`pull` did: the manifest it wrote, instances wanted, fetched, reused, and removed from the cache."""

    manifest: Path
    wanted: int
    fetched: int
    reused: int
    removed: int


def local_dataset(ref: DatasetRef, *, progress: bool = False) -> DatasetRef:
    """The dataset ``ref`` as a local manifest: a PACS dataset is pulled (:func:`pull`) and comes back naming the
    manifest of its cache (``pacs`` cleared); any other dataset comes back unchanged.

    Raises:
        PacsError: the label CSV, the PACS or the cache stands in the way (one line: what and what to do).
    """
    if ref.pacs is None:
        return ref
    return ref.model_copy(update={"manifest": pull(ref.pacs, progress=progress).manifest, "pacs": None})


def cache_folder(source: PacsSource) -> Path:
    """``<cache>/<labels stem>-<digest>/``, the digest (12 hex digits of SHA-256) taken over the endpoint and the
    label CSV's path: one folder per (PACS, label CSV), the same for ``medsilo site check`` and the jobs, so a site
    check fills the cache a job then reuses."""
    key = hashlib.sha256(f"{source.url}\n{source.labels.resolve()}".encode()).hexdigest()[:12]
    return source.cache / f"{source.labels.stem}-{key}"


def pull(source: PacsSource, folder: Path | None = None, *, progress: bool = False) -> PullReport:
    """Bring the dataset's cache folder in line with its label CSV: verify what is cached, fetch what is missing,
    write the manifest.

    Args:
        source: the dataset's PACS settings (a site config's ``datasets.<name>.pacs``).
        folder: the cache folder; default :func:`cache_folder` (created if needed).
        progress: show a progress bar (tqdm) while fetching.

    Returns:
        The manifest written and counts.

    Raises:
        PacsError: bad label CSV (file, line, column), password not found, PACS refused the credentials,
            unreachable, missing instance, cache full.
    """
    folder = cache_folder(source) if folder is None else folder
    header, rows = read_labels(source.labels)
    cap = int(source.max_cache_mb * MB)
    session = requests.Session()
    session.trust_env = False  # no ~/.netrc credentials or proxy from the environment: only the site config's
    guard = _Guard(source.url, cap + MB)  # one answer never holds more than the whole cache (plus framing)
    session.hooks["response"].append(guard)
    if source.username is not None:
        session.auth = (source.username, password(source))
    client = DICOMwebClient(source.url, session=session, timeout=source.timeout_s)
    # dicomweb-client retries a failed request (any exception, HTTP 429/408/503/504) 5 times over ~30 s by
    # default; 3 attempts over ~3 s keep a PACS hiccup from failing a pull without stalling a site on a dead one
    client.set_http_retry_params(max_attempts=RETRIES, wait_exponential_multiplier=500)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name UIDs
    call = _Caller(source)
    wanted = resolve(client, rows, source, call)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # patients' images: the site user's alone
    (folder / INSTANCES).mkdir(exist_ok=True, mode=0o700)
    for path in (folder, folder / INSTANCES):  # a planted link would have the pull delete and write elsewhere
        if path.is_symlink():
            raise PacsError(f"{path}: is a symbolic link (to {path.resolve()}); the PACS cache holds real folders "
                            "only: remove the link, then run again", public="its PACS cache holds a symbolic link")  # fmt: skip
    with _locked(folder):
        index = _read_index(folder)
        reused, removed = _verify(folder, index, {i.sop for i in wanted})
        missing = [i for i in wanted if i.sop not in index]
        fetched = 0
        try:
            for inst in tqdm(
                missing, desc=f"pull {folder.name}", unit="img", disable=not progress, leave=False
            ):
                used = sum(e["bytes"] for e in index.values())
                guard.limit = cap - used + MB
                data = call(partial(_instance_bytes, client, inst), line=inst.line, labels=source.labels)
                if used + len(data) > cap:
                    raise PacsError(
                        f"{folder}: the cache would pass pacs.max_cache_mb ({source.max_cache_mb:g} MB) with "
                        f"{len(index)} of {len(wanted)} instances cached ({used / MB:.1f} MB); raise "
                        f"pacs.max_cache_mb or list fewer instances in {source.labels}, then run again"
                    )
                write_atomic(
                    folder / INSTANCES / f"{inst.sop}.dcm",
                    data,
                    PRIVATE,
                    what="cached instance",
                    error=PacsError,
                )
                index[inst.sop] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                fetched += 1
                if fetched % 50 == 0:  # a cut-off pull keeps what it fetched; a job's log shows the progress
                    _write_index(folder, index)
                    log.info(
                        "PACS dataset %s: %d of %d instances fetched", folder.name, fetched, len(missing)
                    )
        finally:
            _write_index(folder, index)
        manifest = folder / MANIFEST
        with atomic_open(manifest, "w", perms=PRIVATE, newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", *header])
            writer.writerows([f"{INSTANCES}/{i.sop}.dcm", *i.cells] for i in wanted)
    log.info("PACS dataset %s: %d instances, %d fetched, %d reused, %d removed from the cache",
             folder.name, len(wanted), fetched, reused, removed)  # fmt: skip
    return PullReport(manifest, len(wanted), fetched, reused, removed)


def read_labels(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str], tuple[str, ...]]]]:
    """Parse a label CSV.

    Returns:
        The manifest columns (every column but the UID columns, in order) and, per row, its line, its UID cells
        (``study_uid``, ``series_uid``, ``sop_uid``; blank when absent) and its manifest cells.

    Raises:
        PacsError: missing or unreadable file, no ``study_uid`` column, a ``path`` column, no rows, a row
            without ``study_uid`` or with a malformed UID (file, line and column named).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            columns = [c.strip() for c in next(reader, [])]
            body = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise PacsError(f"{path}: label CSV not found; check the dataset's pacs.labels") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PacsError(f"{path}: label CSV cannot be read ({exc}); write it as UTF-8 CSV") from None
    if "study_uid" not in columns:
        raise PacsError(f"{path}: line 1: no study_uid column; a label CSV has study_uid[,series_uid][,sop_uid],"
                        f"label[,patient_id,split], got columns {', '.join(columns) or '(none)'}")  # fmt: skip
    if "path" in columns:
        raise PacsError(f"{path}: line 1: column path: a label CSV names instances by UID, not by path; "
                        "drop the path column (or use manifest: for files on disk)")  # fmt: skip
    if len(set(columns)) != len(columns):
        raise PacsError(f"{path}: line 1: a column appears twice")
    header = [c for c in columns if c not in UID_COLUMNS]
    rows = []
    for line, cells in body:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            raise PacsError(f"{path}: line {line}: {len(cells)} cells, the header has {len(columns)}")
        record = dict(zip(columns, (c.strip() for c in cells)))
        uids = {k: record.get(k, "") for k in UID_COLUMNS}
        for key, value in uids.items():
            if value and (len(value) > 64 or not UID.fullmatch(value)):
                raise PacsError(f"{path}: line {line}: column {key}: not a DICOM UID (digits and dots, at most "
                                "64 characters)")  # fmt: skip
        if not uids["study_uid"]:
            raise PacsError(f"{path}: line {line}: column study_uid: empty; every row names its study")
        rows.append((line, uids, tuple(record[c] for c in header)))
    if not rows:
        raise PacsError(f"{path}: no rows; list the instances this dataset uses")
    return header, rows


def resolve(client: DICOMwebClient, rows: list, source: PacsSource, call: Callable) -> list[Instance]:
    """One :class:`Instance` per instance the rows name; a row with a blank ``series_uid`` or ``sop_uid`` is
    looked up with QIDO-RS.

    Raises:
        PacsError: a row that matches no instance, an instance named twice, or a PACS error.
    """
    found: list[Instance] = []
    seen: dict[str, int] = {}
    for line, uids, cells in rows:
        study, series, sop = uids["study_uid"], uids["series_uid"], uids["sop_uid"]
        if series and sop:
            matches = [(study, series, sop)]
        else:

            def search(study=study, series=series, sop=sop, line=line) -> list[tuple[str, str, str]]:
                # paged here rather than with get_remaining=True, which asks for pages until one is empty:
                # a hostile PACS that never sends an empty page would keep the site asking forever
                found: list[tuple[str, str, str]] = []
                while True:
                    page = client.search_for_instances(
                        study_instance_uid=study, series_instance_uid=series or None,
                        search_filters={"SOPInstanceUID": sop} if sop else None,
                        fields=[TAG_STUDY, TAG_SERIES, TAG_SOP], offset=len(found) or None,
                    )  # fmt: skip
                    if not page:
                        return found
                    found += [_uids(r) for r in page]
                    if len(found) > MAX_MATCHES:
                        raise PacsError(f"{source.labels}: line {line}: {source.url} lists more than {MAX_MATCHES} "
                                        "instances for this row; name its series (series_uid) or instances "
                                        "(sop_uid)", public="a row of its label CSV matches too many instances")  # fmt: skip

            matches = call(search, line=line, labels=source.labels, looking=True)
            if sop:  # some servers ignore an unknown filter: keep the named instance only
                matches = [m for m in matches if m[2] == sop]
            if not matches:
                raise PacsError(f"{source.labels}: line {line}: {source.url} has no instance matching this row; "
                                "check its UIDs (or remove the row)")  # fmt: skip
        for st, se, so in sorted(matches, key=lambda m: (m[1], m[2])):
            if so in seen:
                raise PacsError(f"{source.labels}: line {line}: names an instance that line {seen[so]} names "
                                "already; give each instance one row")  # fmt: skip
            seen[so] = line
            found.append(Instance(st, se, so, line, cells))
    return found


def password(source: PacsSource) -> str:
    """The PACS password, from the environment variable ``password_env`` or the file ``password_file``.

    Raises:
        PacsError: the variable is unset or empty; the file is missing, empty, not a regular file, not owned by
            this user, or readable by others (group/other permission bits set).
    """
    if source.password_env is not None:
        value = os.environ.get(source.password_env, "")
        if not value:
            raise PacsError(f"pacs.password_env: environment variable {source.password_env} is not set (or "
                            "empty); set it in the site's environment before starting the site")  # fmt: skip
        return value
    path = source.password_file
    assert path is not None, "PacsSource validation: a username comes with a password source"
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise PacsError(f"pacs.password_file: {path} is not a regular file")
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise PacsError(f"pacs.password_file: {path} must be owned by this user and readable by it alone "
                            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")  # fmt: skip
        value = path.read_text(encoding="utf-8").splitlines()[0:1]
    except FileNotFoundError:
        raise PacsError(f"pacs.password_file: {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PacsError(f"pacs.password_file: {path} cannot be read ({exc}); check its permissions") from None
    if not value or not value[0]:
        raise PacsError(f"pacs.password_file: {path} is empty; write the password on its first line")
    return value[0]


class _TooLarge(Exception):
    """An answer longer than the cache has room for (after any HTTP compression is undone)."""


class _Redirected(Exception):
    """A redirect off the PACS's own scheme, host and port."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _Guard:
    """A ``requests`` response hook for every PACS answer: a redirect must stay on ``pacs.url``'s scheme, host and
    port (basic auth would otherwise go with it over plain HTTP, or the answer come from elsewhere), and a body is
    read here, before ``requests`` would read it whole, stopping past ``limit`` bytes (an endless answer, a
    gzip bomb: the count is of decoded bytes)."""

    def __init__(self, url: str, limit: int):
        self.origin, self.limit = _origin(url), limit

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        if response.is_redirect:
            target = _origin(urljoin(response.url, response.headers.get("Location", "")))
            response.close()
            if target != self.origin:
                raise _Redirected(f"{target[0]}://{target[1]}" + (f":{target[2]}" if target[2] else ""))
            return response
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.limit:
            response.close()
            raise _TooLarge
        body = bytearray()
        for chunk in response.iter_content(1 << 20):
            body += chunk
            if len(body) > self.limit:
                response.close()
                raise _TooLarge
        response._content = bytes(body)  # what response.content then returns, read no further
        return response


class _Caller:
    """Runs one DICOMweb request and turns what can go wrong into one :class:`PacsError` line."""

    def __init__(self, source: PacsSource):
        self.source = source

    def __call__(self, request: Callable[[], T], *, line: int, labels: Path, looking: bool = False) -> T:
        url = self.source.url
        try:
            return request()
        except _TooLarge:
            raise PacsError(f"{url}: an answer of the PACS is larger than the room left under pacs.max_cache_mb "
                            f"({self.source.max_cache_mb:g} MB) (label CSV line {line}); raise pacs.max_cache_mb if "
                            "the instances are this large, else check the PACS",
                            public="its PACS sent an answer larger than its cache allows") from None  # fmt: skip
        except _Redirected as exc:
            raise PacsError(f"{url}: the PACS answered with a redirect to {exc} (label CSV line {line}); medsilo "
                            "follows no redirect off pacs.url: set pacs.url to the PACS's own DICOMweb root",
                            public="its PACS redirected it to another host") from None  # fmt: skip
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                src = self.source
                if src.username is None:
                    fix = "it asks for credentials: set pacs.username and pacs.password_env (or pacs.password_file)"
                else:
                    held = (
                        f"environment variable {src.password_env}"
                        if src.password_env
                        else str(src.password_file)
                    )
                    fix = f"check pacs.username and the password in {held}, and that this user may read the studies"
                raise PacsError(f"{url}: the PACS refused the credentials (HTTP {code}); {fix}",
                                public=f"its PACS refused the credentials (HTTP {code})") from None  # fmt: skip
            if code == 404:
                what = "no instance matching this row" if looking else "no such instance"
                raise PacsError(f"{labels}: line {line}: {url} has {what} (HTTP 404); check the row's UIDs against "
                                "the PACS (or remove the row)",
                                public="an instance its label CSV names is missing from its PACS") from None  # fmt: skip
            raise PacsError(f"{url}: the PACS answered HTTP {code} (label CSV line {line}); check the PACS and "
                            "its DICOMweb service, then run again", public=f"its PACS answered HTTP {code}") from None  # fmt: skip
        except requests.Timeout:
            raise PacsError(f"{url}: the PACS did not answer within pacs.timeout_s ({self.source.timeout_s:g} s); "
                            "check that it is up and reachable from this machine, or raise the timeout",
                            public="its PACS did not answer in time") from None  # fmt: skip
        except requests.ConnectionError:
            raise PacsError(f"{url}: cannot connect to the PACS (refused, unknown host or no route); check "
                            f"pacs.url and that the PACS is up and reachable from this machine",
                            public="its PACS is unreachable") from None  # fmt: skip
        except (
            requests.RequestException,
            ValueError,
            InvalidDicomError,
            KeyError,
            IndexError,
            TypeError,
            EOFError,
            AttributeError,
            OverflowError,
        ) as exc:  # a malformed answer (dicomweb-client, pydicom)
            raise PacsError(f"{url}: unusable answer from the PACS (label CSV line {line}: {type(exc).__name__}); "
                            "check its DICOMweb service", public="its PACS gave an unusable answer") from None  # fmt: skip


def _instance_bytes(client: DICOMwebClient, inst: Instance) -> bytes:
    """WADO-RS retrieve of one instance in the transfer syntax the PACS stores, as DICOM Part 10 bytes."""
    ds = client.retrieve_instance(
        inst.study, inst.series, inst.sop, media_types=(("application/dicom", "*"),)
    )
    if str(ds.get("SOPInstanceUID", "")) != inst.sop:
        raise ValueError("the PACS returned another instance than asked for")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _uids(result: dict[str, Any]) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of one QIDO-RS JSON result (PS3.18 §F.2)."""
    try:
        uids = tuple(str(result[tag]["Value"][0]) for tag in (TAG_STUDY, TAG_SERIES, TAG_SOP))
    except (KeyError, IndexError, TypeError):
        raise ValueError("a QIDO-RS result lacks a UID") from None
    if not all(len(u) <= 64 and UID.fullmatch(u) for u in uids):
        raise ValueError("a QIDO-RS result holds a malformed UID")
    return uids  # type: ignore[return-value]


def _read_index(folder: Path) -> dict[str, dict[str, Any]]:
    """The cache's ``{sop: {sha256, bytes}}`` record; an unreadable index counts as empty (all is refetched)."""
    try:
        data = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        entries = data["instances"]
        return {k: {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])} for k, v in entries.items()
                if UID.fullmatch(k)}  # fmt: skip
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        log.warning("%s: cache index unreadable; every cached instance is fetched again", folder / INDEX)
        return {}


def _write_index(folder: Path, index: dict[str, dict[str, Any]]) -> None:
    write_atomic(folder / INDEX, json.dumps({"version": 1, "instances": index}, indent=0, sort_keys=True),
                 PRIVATE, what="cache index", error=PacsError)  # fmt: skip


def _verify(folder: Path, index: dict[str, dict[str, Any]], wanted: set[str]) -> tuple[int, int]:
    """Keep in ``index`` only the cached files that are wanted and still hash to their record; delete the rest.
    Returns (files kept, files removed)."""
    removed = changed = 0
    for path in sorted((folder / INSTANCES).iterdir()):
        if not path.is_file() and not path.is_symlink():
            continue
        sop = path.name.removesuffix(".dcm")
        # a symbolic link is never kept (it would hand the readers a file outside the cache); unlinking it
        # removes the link only
        keep = path.name.endswith(".dcm") and sop in wanted and sop in index and not path.is_symlink()
        if keep and not _hash_matches(path, index[sop]):
            keep, changed = False, changed + 1
        if (
            not keep
        ):  # unwanted, unrecorded (a pull cut off between file and index), changed, or a stray temp file
            index.pop(sop, None)
            path.unlink()
            removed += 1
    for sop in [s for s in index if not (folder / INSTANCES / f"{s}.dcm").is_file()]:
        del index[sop]
    if changed:
        log.warning(
            "%s: %d cached file(s) differ from their recorded SHA-256; fetching them again", folder, changed
        )
    return len(index), removed


def _hash_matches(path: Path, entry: dict[str, Any]) -> bool:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == entry["sha256"] and path.stat().st_size == entry["bytes"]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One pull of a cache folder at a time (a site check and a job starting together wait for each other)."""
    try:  # O_NOFOLLOW: a planted link would have the site create or touch a file elsewhere
        fd = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, PRIVATE)
    except OSError as exc:
        raise PacsError(f"{folder / '.lock'}: cannot open the cache's lock file ({exc.strerror}); if it is a "
                        "symbolic link, remove it, then run again", public="its PACS cache cannot be locked") from None  # fmt: skip
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
