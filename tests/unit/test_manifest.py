"""Manifests: parsing, patient-level splits, and messages that name file, line and column."""

from __future__ import annotations

import pytest

from medsilo.config.manifest import ManifestError, assign_split, read_manifest, write_manifest


def _write(tmp_path, text: str):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_parses_rows_with_paths_relative_to_the_manifest(tmp_path):
    path = _write(tmp_path, "path,label,patient_id,split\na.dcm,normal,P1,train\nsub/b.dcm,pneumonia,P2,test\n")
    m = read_manifest(path, ["normal", "pneumonia"])
    assert m.classes == ("normal", "pneumonia")
    assert [r.path for r in m.rows] == [tmp_path / "a.dcm", tmp_path / "sub" / "b.dcm"]
    assert [r.label for r in m.rows] == [0, 1]
    assert [r.line for r in m.rows] == [2, 3]
    assert m.counts() == {"train": {"normal": 1, "pneumonia": 0}, "val": {"normal": 0, "pneumonia": 0},
                          "test": {"normal": 0, "pneumonia": 1}}  # fmt: skip


def test_classes_default_to_sorted_labels_and_header_case_is_ignored(tmp_path):
    path = _write(tmp_path, "\ufeffPath, Label ,Patient_ID,Split\na,tumor,P1,val\nb,normal,P2,train\n")
    m = read_manifest(path)
    assert m.classes == ("normal", "tumor")
    assert [r.split for r in m.rows] == ["val", "train"]


def test_missing_split_is_assigned_by_patient_hash(tmp_path):
    rows = [f"img{i}.png,{'normal' if i % 2 else 'tumor'},P{i // 3}" for i in range(300)]
    path = _write(tmp_path, "path,label,patient_id\n" + "\n".join(rows) + "\n")
    m = read_manifest(path)
    by_patient: dict[str, set[str]] = {}
    for r in m.rows:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
        assert r.split == assign_split(r.patient_id)
    assert all(len(s) == 1 for s in by_patient.values())  # a patient's images share a split
    shares = {s: sum(r.split == s for r in m.rows) / len(m.rows) for s in ("train", "val", "test")}
    assert 0.45 < shares["train"] < 0.75 and shares["val"] > 0.1 and shares["test"] > 0.1


def test_assign_split_is_stable_and_follows_fractions():
    assert assign_split("patient-42") == assign_split("patient-42")
    assert {assign_split(f"p{i}", (1.0, 0.0, 0.0)) for i in range(50)} == {"train"}
    assert {assign_split(f"p{i}", (0.0, 0.0, 1.0)) for i in range(50)} == {"test"}


def test_no_patient_column_warns(tmp_path):
    path = _write(tmp_path, "path,label\na,x\nb,y\n")
    with pytest.warns(UserWarning, match="no patient_id column"):
        m = read_manifest(path)
    assert len(m.rows) == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"empty manifest"),
        ("path,label\n", r"header but no rows"),
        ("path,lable\na,x\n", r"line 1: unknown column 'lable'; did you mean 'label'\?"),
        ("path,patient_id\na,P1\n", r"line 1: missing required column 'label'"),
        ("path,label,patient_id\na,normal\n", r"line 2: expected 3 values, got 2"),
        ("path,label,patient_id\na,pnuemonia,P1\n", r"line 2: label: 'pnuemonia' is not a class of this job; did you mean 'pneumonia'\?"),
        ("path,label,patient_id,split\na,normal,P1,training\n", r"line 2: split: 'training' is not a split; did you mean 'train'\?"),
        ("path,label,patient_id\na,normal,P1\na,pneumonia,P2\n", r"line 3: path: same image as line 2"),
        ("path,label,patient_id\na,normal,\n", r"line 2: patient_id: empty"),
        ("path,label,patient_id,split\na,normal,P1,train\nb,normal,P1,test\n",
         r"line 3: split: this patient is in 'train' on line 2 and in 'test' here; splits must be by patient"),
    ],
)  # fmt: skip
def test_bad_manifests_name_line_and_column(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(path, ["normal", "pneumonia"])
    assert str(path) in str(info.value)


def test_patient_ids_never_appear_in_messages(tmp_path):
    path = _write(tmp_path, "path,label,patient_id,split\na,normal,SMITH-1937,train\nb,normal,SMITH-1937,val\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path, ["normal"])
    assert "SMITH" not in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_write_then_read_round_trip(tmp_path):
    rows = [{"path": "images/1.dcm", "label": "normal", "patient_id": "H1-P1", "split": "train"},
            {"path": "images/2.dcm", "label": "pneumonia", "patient_id": "H1-P2", "split": "test", "source": "pcevolve"}]  # fmt: skip
    path = tmp_path / "m.csv"
    write_manifest(path, rows)
    m = read_manifest(path, ["normal", "pneumonia"])
    assert [(r.path.name, r.label, r.split, r.source) for r in m.rows] == [
        ("1.dcm", 0, "train", ""), ("2.dcm", 1, "test", "pcevolve")
    ]
    assert not (tmp_path / "m.csv.tmp").exists()
