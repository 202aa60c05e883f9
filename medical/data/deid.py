"""De-identification check for DICOM files, run before anything trains (DESIGN §8).

A file is *identifying* when any attribute that the DICOM basic application-level confidentiality
profile (`PS3.15 Annex E, Table E.1-1 <https://dicom.nema.org/medical/dicom/current/output/chtml/part15/chapter_E.html>`_)
removes or blanks still holds a value. Two groups are treated differently:

* :data:`ALWAYS_EMPTY` — birth date, addresses, telephone numbers, other IDs and names, free-text
  patient notes. De-identification removes or empties these; a value here always refuses the file.
* :data:`PSEUDONYMISABLE` — patient name and ID, accession number, physicians, institution, station.
  De-identifiers replace these with pseudonyms, so a value is accepted when the file declares
  (0012,0062) *Patient Identity Removed* = ``YES``; otherwise it refuses the file.

(0028,0301) *Burned In Annotation* = ``YES`` (identifying text in the pixels) always refuses the file.
A site may accept identifiable files with ``data.allow_identifiable_dicom: true`` in its config.

Findings name attribute keywords only, never their values: the check must not itself leak identifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydicom.datadict import tag_for_keyword

ALWAYS_EMPTY: tuple[str, ...] = (
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "CountryOfResidence",
    "RegionOfResidence", "Occupation", "PatientInsurancePlanCodeSequence", "PatientComments",
    "AdditionalPatientHistory", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "InstitutionAddress", "PatientReligiousPreference", "ResponsiblePerson", "ResponsibleOrganization",
)  # fmt: skip
PSEUDONYMISABLE: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "InstitutionName",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
)  # fmt: skip

_TAG_KEYS = {kw: f"{tag_for_keyword(kw):08X}" for kw in (*ALWAYS_EMPTY, *PSEUDONYMISABLE,
                                                        "PatientIdentityRemoved", "BurnedInAnnotation")}  # fmt: skip


def _filled(value: Any) -> bool:
    """True when a value holds content: a DICOM-JSON element, a pydicom value, a list or a string."""
    if value is None:
        return False
    if isinstance(value, (str, bytes)):
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        return text.strip() != ""
    if isinstance(value, Mapping):  # DICOM JSON element, person name {"Alphabetic": ..} or sequence item
        inner = value.get("Value", None) if "vr" in value else list(value.values())
        return _filled(inner)
    if isinstance(value, Iterable):  # lists, pydicom MultiValue and Sequence
        return any(_filled(v) for v in value)
    return str(value).strip() != ""


def _first(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("Value", [])
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        value = next(iter(value), "")
    return str(value or "").strip().upper()


def identifying_attributes(get: Callable[[str], Any]) -> list[str]:
    """Keywords of the attributes that make a file identifying (empty list: the file passes).

    Args:
        get: returns the raw value of an attribute keyword (``None`` when absent).
    """
    found = [kw for kw in ALWAYS_EMPTY if _filled(get(kw))]
    if _first(get("PatientIdentityRemoved")) != "YES":
        found += [kw for kw in PSEUDONYMISABLE if _filled(get(kw))]
    if _first(get("BurnedInAnnotation")) == "YES":
        found.append("BurnedInAnnotation")
    return found


def identifying_in_json_meta(meta: Mapping[str, Any]) -> list[str]:
    """:func:`identifying_attributes` over DICOM-JSON metadata keyed ``"GGGGEEEE"`` (as MONAI returns it)."""
    return identifying_attributes(lambda kw: meta.get(_TAG_KEYS[kw]))


def identifying_in_dataset(ds: Any) -> list[str]:
    """:func:`identifying_attributes` over a ``pydicom.Dataset``."""
    return identifying_attributes(ds.get)
