"""Hostile data sources: a PACS (or a man in the middle) answering with hostile bodies, someone who can write the
PACS and tile caches, and hostile whole-slide files and slide manifests.

The hostile PACS is a small standard-library HTTP server on loopback that speaks just enough DICOMweb
(QIDO-RS JSON, WADO-RS ``multipart/related; type="application/dicom"``) for
:func:`medsilo.medical.data.pacs.pull`; each test picks what it answers. Nothing here needs Orthanc.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medsilo.config.site import PacsSource, SlideTiling
from medsilo.medical.data.pacs import INDEX, INSTANCES, PacsError, pull
from medsilo.medical.data.slides import TILES_FILE, SlideError, tile_slides

SECRET = "hunter2-pacs-s3cret"
STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
)
BOUNDARY = "medsilo-boundary"


def _dicom(sop: str = SOP, name: str = "Smith^John") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientName = STUDY, SERIES, name
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(16)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(*parts: bytes) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class Hostile:
    """What the hostile PACS answers to a WADO-RS retrieve: ``(status, headers, body or body chunks)``."""

    def __init__(self):
        self.answer = lambda path: (200, {"Content-Type": MULTIPART}, _multipart(_dicom()))
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header)


def _serve(hostile: Hostile) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hostile.seen.append((self.path, self.headers.get("Authorization")))
            try:
                status, headers, body = hostile.answer(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:  # an endless (or long) body, streamed without a length
                    self.end_headers()
                    for chunk in body:
                        self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"


@pytest.fixture
def pacs(tmp_path, monkeypatch):
    """(hostile PACS, its source settings with a password in the environment)."""
    hostile = Hostile()
    server, url = _serve(hostile)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study_uid,series_uid,sop_uid,label\n{STUDY},{SERIES},{SOP},normal\n")
    monkeypatch.setenv("MEDSILO_TEST_HOSTILE_PACS", SECRET)
    source = PacsSource(
        url=url, labels=labels, username="medsilo", password_env="MEDSILO_TEST_HOSTILE_PACS",
        cache=tmp_path / "cache", max_cache_mb=1, timeout_s=5,
    )  # fmt: skip
    yield hostile, source
    server.shutdown()
    server.server_close()


def _refused(source: PacsSource, caplog, match: str) -> PacsError:
    with caplog.at_level(logging.DEBUG), pytest.raises(PacsError, match=match) as info:
        pull(source)
    message = str(info.value)
    assert "\n" not in message and SECRET not in message and SECRET not in caplog.text
    assert "Smith" not in message and "Smith" not in caplog.text
    return info.value


def test_an_honest_answer_is_cached(pacs, caplog):
    hostile, source = pacs
    with caplog.at_level(logging.DEBUG):
        report = pull(source)
    assert (report.fetched, report.wanted) == (1, 1)
    assert SECRET not in caplog.text and "Smith" not in caplog.text


def test_another_instance_than_asked_is_refused(pacs, caplog):
    hostile, source = pacs
    hostile.answer = lambda path: (200, {"Content-Type": MULTIPART}, _multipart(_dicom(sop="1.2.3.4")))
    _refused(source, caplog, "unusable answer from the PACS")
    assert not list((source.cache).rglob("*.dcm"))


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"Content-Type": MULTIPART}, _multipart(b"<html>not dicom</html>")),
        (200, {"Content-Type": MULTIPART}, _multipart(_dicom()[:200])),  # cut short
        (200, {"Content-Type": MULTIPART}, _multipart()),  # no part at all
        (200, {"Content-Type": "text/html"}, b"<html>login</html>"),
        (200, {}, b"\x00" * 64),  # no Content-Type
    ],
    ids=["html-part", "truncated", "no-part", "html", "no-content-type"],
)
def test_a_body_that_is_not_dicom_is_one_line(pacs, caplog, answer):
    hostile, source = pacs
    hostile.answer = lambda path: answer
    _refused(source, caplog, "PACS")
    assert not list((source.cache).rglob("*.dcm"))


def test_an_endless_body_stops_at_the_cache_limit(pacs, caplog):
    hostile, source = pacs  # max_cache_mb: 1; the PACS streams 64 MB without a length

    def endless(path):
        return 200, {"Content-Type": MULTIPART}, (b"\0" * (1 << 20) for _ in range(64))

    hostile.answer = endless
    _refused(source, caplog, "max_cache_mb")


def test_a_gzip_bomb_stops_at_the_cache_limit(pacs, caplog):
    hostile, source = pacs  # 64 MB of zeros in ~64 KB of gzip: requests would inflate it whole
    bomb = gzip.compress(_multipart(_dicom() + b"\0" * (64 << 20)), compresslevel=9)
    hostile.answer = lambda path: (200, {"Content-Type": MULTIPART, "Content-Encoding": "gzip"}, bomb)
    _refused(source, caplog, "max_cache_mb")


def test_a_redirect_to_another_host_gets_no_password(pacs, caplog):
    hostile, source = pacs
    other = Hostile()
    server, other_url = _serve(other)
    try:
        elsewhere = other_url.replace("127.0.0.1", "localhost")
        hostile.answer = lambda path: (302, {"Location": elsewhere + path.removeprefix("/dicom-web")}, b"")
        _refused(source, caplog, "redirect")
        assert all(auth is None for _, auth in other.seen)
        assert all(auth is not None for _, auth in hostile.seen)
    finally:
        server.shutdown()
        server.server_close()


def test_a_qido_uid_that_climbs_out_of_the_cache_is_refused(pacs, caplog):
    hostile, source = pacs
    source.labels.write_text(f"study_uid,series_uid,sop_uid,label\n{STUDY},,,normal\n")
    row = {"0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
           "00080018": {"vr": "UI", "Value": ["../../../../tmp/evil"]}}  # fmt: skip
    hostile.answer = lambda path: (
        200,
        {"Content-Type": "application/dicom+json"},
        json.dumps([row]).encode(),
    )
    _refused(source, caplog, "unusable answer")
    assert not list(source.cache.rglob("*evil*"))


def _cache(source: PacsSource) -> Path:
    pull(source)  # an honest first pull makes the folder
    return next(source.cache.iterdir())


def test_a_planted_instances_symlink_deletes_nothing_outside(pacs, caplog, tmp_path):
    hostile, source = pacs
    folder = _cache(source)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    shutil.rmtree(folder / INSTANCES)
    (folder / INSTANCES).symlink_to(victim)
    _refused(source, caplog, "symbolic link")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_planted_instance_symlink_is_not_read_through(pacs, tmp_path):
    hostile, source = pacs
    folder = _cache(source)
    outside = tmp_path / "other-patient.dcm"
    outside.write_bytes(_dicom(name="Doe^Jane"))
    cached = folder / INSTANCES / f"{SOP}.dcm"
    cached.unlink()
    cached.symlink_to(outside)
    digest = __import__("hashlib").sha256(outside.read_bytes()).hexdigest()
    (folder / INDEX).write_text(
        json.dumps({"instances": {SOP: {"sha256": digest, "bytes": outside.stat().st_size}}})
    )
    report = pull(source)
    assert report.fetched == 1 and not cached.is_symlink()
    assert str(pydicom.dcmread(cached).PatientName) == "Smith^John"
    assert outside.exists()


@pytest.mark.parametrize(
    "index",
    [
        b"[" * 100_000,
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",
    ],
    ids=["deeply-nested-json", "pickle"],
)
def test_a_tampered_index_is_ignored_and_refetched(pacs, caplog, index):
    hostile, source = pacs
    folder = _cache(source)
    (folder / INDEX).write_bytes(index)
    with caplog.at_level(logging.WARNING):
        report = pull(source)
    assert report.fetched == 1 and "cache index unreadable" in caplog.text


def test_a_job_cannot_name_a_pacs_a_cache_or_a_path():
    from pydantic import TypeAdapter, ValidationError

    from medsilo.config.job import JobSpec

    assert not {"pacs", "url", "password_env", "password_file", "cache", "slides", "manifest"} & set(
        JobSpec.model_fields
    )
    field = JobSpec.model_fields["dataset"]
    dataset = TypeAdapter(Annotated[field.annotation, *field.metadata])
    for name in ("../data_cache", "/data/cxr", {"pacs": {"url": "http://evil"}}):
        with pytest.raises(ValidationError):
            dataset.validate_python(name)


# --- whole slides -----------------------------------------------------------------------------------------


def _tiff(path: Path, side: int = 256, tile: int = 128, mpp: float = 0.5) -> None:
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[: side // 2, ..., 1] = 40  # saturated: tissue
    tags = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(tile, tile), photometric="rgb", compression="zlib", **tags)


def _slides(tmp_path: Path, row: str = "s.tif,tumor,p1,train,,,,") -> Path:
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,label,patient_id,split,x,y,w,h\n{row}\n")
    return manifest


SMALL = SlideTiling(patch_size=16, mpp=4.0, max_patches=4, min_tissue=0.1)


def test_a_tampered_tiles_json_cannot_point_outside_the_cache(tmp_path):
    _tiff(tmp_path / "s.tif")
    manifest = _slides(tmp_path)
    first = tile_slides(manifest, SMALL)
    outside = tmp_path / "patient-scan.png"
    outside.write_bytes(b"x")
    row = next(p for p in (tmp_path / ".medsilo-tiles").iterdir() if p.is_dir())
    tiles = json.loads((row / TILES_FILE).read_text())
    for names in (["../../patient-scan.png"], [str(outside)]):
        (row / TILES_FILE).write_text(json.dumps(tiles | {"patches": names}))
        again = tile_slides(manifest, SMALL)
        assert again.tiled == 1 and "patient-scan" not in again.manifest.read_text()
    name = json.loads((row / TILES_FILE).read_text())["patches"][0]
    (row / name).unlink()
    (row / name).symlink_to(outside)  # a planted patch that is another file
    again = tile_slides(manifest, SMALL)
    assert again.tiled == 1 and not (row / name).is_symlink() and first.patches == again.patches


@pytest.mark.parametrize(
    "region", ["-1,0,64,64", "0,0,0,64", "0,0,999999999999999999999,64", "0,0,4096,4096"]
)
def test_a_hostile_region_is_refused(tmp_path, region):
    _tiff(tmp_path / "s.tif")
    with pytest.raises(SlideError, match="line 2: .*(x,y,w,h|outside the slide)"):
        tile_slides(_slides(tmp_path, f"s.tif,tumor,p1,train,{region}"), SMALL)


def test_a_symlinked_slide_outside_the_manifest_folder_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    _tiff(tmp_path / "elsewhere" / "s.tif")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "s.tif").symlink_to(tmp_path / "elsewhere" / "s.tif")
    with pytest.raises(SlideError, match="symbolic link"):
        tile_slides(_slides(tmp_path / "site"), SMALL)


def test_a_slide_declaring_an_enormous_size_is_refused_before_reading(tmp_path):
    # a real single-level tiled TIFF of 2,097,152 × 1,024 pixels at 0.5 µm/px whose tiles are all empty (a few
    # MB on disk); with no pyramid, masking it for 64-px patches at 4 µm/px reads 2²¹ × 512 pixels at
    # once: 4 GB of RGBA
    path = tmp_path / "s.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        zero = np.zeros((256, 256, 3), np.uint8)  # the same blank tile, zlib-compressed: ~8 MB on disk
        tif.write((zero for _ in range(4 * 8192)), shape=(1024, 1 << 21, 3), dtype=np.uint8, tile=(256, 256),
                  photometric="rgb", compression="zlib", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    with pytest.raises(
        SlideError, match=r"line 2: slide .*s.tif: the slide is too large to tile \(2097152×1024"
    ):
        tile_slides(_slides(tmp_path), SlideTiling(patch_size=64, mpp=4.0, max_patches=4))


def test_secrets_stay_out_of_a_refused_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o644)
    source = PacsSource(
        url="http://127.0.0.1:9/x", labels=tmp_path / "l.csv", username="u", password_file=secret
    )
    (tmp_path / "l.csv").write_text(f"study_uid,label\n{STUDY},a\n")
    with pytest.raises(PacsError, match="chmod 600") as info:
        pull(source)
    assert SECRET not in str(info.value)


def test_an_endless_qido_listing_stops(pacs, caplog):
    hostile, source = (
        pacs  # every page holds one more instance: a client asking until a page is empty never stops
    )
    source.labels.write_text(f"study_uid,series_uid,sop_uid,label\n{STUDY},,,normal\n")

    def pages(path):
        rows = [{"0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
                 "00080018": {"vr": "UI", "Value": [f"1.2.{len(hostile.seen)}.{k}"]}} for k in range(20_000)]  # fmt: skip
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(rows).encode()

    hostile.answer = pages
    _refused(
        source.model_copy(update={"max_cache_mb": 50}),
        caplog,
        "line 2: .* lists more than 100000 instances for this row",
    )
