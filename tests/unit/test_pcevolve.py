"""PCEvolve: the utility and its DP selection, ε accounting, the budget cap, the generator's isolation
from private data, and a short end-to-end run of ``medsilo pcevolve``."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pydicom
import pytest
import torch

from medsilo.cli import main
from medsilo.config.manifest import read_manifest
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.medical.data import load_site_data
from medsilo.medical.models.pretrained import WEIGHTS_SHA256
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.pcevolve.evolve import (
    PCEvolveConfig,
    evolve,
    keep_scores,
    selectivity,
    utilities,
    vote_utilities,
)
from medsilo.medical.synth.pcevolve.generators import procedural
from medsilo.secure.budget import BudgetBook, SelectionCharge
from medsilo.secure.dp import (
    BudgetExceeded,
    ExponentialEvent,
    exponential_mechanism,
    exponential_probabilities,
)
from medsilo.secure.keys import LEDGER_DIR_ENV, Party, ensure_simulation_pki
from medsilo.secure.ledger import LEDGER_FILE, entries, verify


def test_utilities_filter_and_calibrate_by_hand():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    # candidates of class 0 at distances 1, 2, 3 from centre 0; the last one is nearer centre 1
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [8.0, 0.0]])
    u, g = utilities(feats, centres, label=0, tau=10.0)
    assert g.tolist() == [True, True, True, False]
    expected = [1.0, math.exp(-10 * 0.5), math.exp(-10.0), 0.0]  # exp(−τ (ℓ − ℓmin)/(ℓmax − ℓmin))
    assert u.tolist() == pytest.approx(expected)
    # one passing candidate (ℓmax = ℓmin): it gets 1, the failing ones 0
    u, g = utilities(feats[2:], centres, label=0, tau=10.0)
    assert u.tolist() == [1.0, 0.0]
    # none passing: every utility 0, so the exponential mechanism draws uniformly
    u, g = utilities(feats[3:], centres, label=0, tau=10.0)
    assert u.tolist() == [0.0] and not bool(g.any())


def test_selection_frequencies_follow_the_exponential_mechanism():
    u = torch.tensor([1.0, math.exp(-5.0), 0.0])
    eps = 4.0
    expected = torch.exp(eps * u / 2) / torch.exp(eps * u / 2).sum()
    torch.testing.assert_close(exponential_probabilities(u, eps, 1.0), expected.double())
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([int(exponential_mechanism(u, eps, 1.0, gen).indices[0]) for _ in range(6000)])
    freq = torch.bincount(draws, minlength=3).double() / 6000
    torch.testing.assert_close(freq, expected.double(), atol=0.02, rtol=0)
    assert selectivity(eps) == pytest.approx(math.exp(2.0))  # best vs worst, at most e^{ε/2}


def _private(n_per_class: int = 3, size: int = 16, seed: int = 0):
    gen = procedural("cxr", ["normal", "pneumonia"], size)
    rng = np.random.default_rng(seed + 100)
    cands = [c for label in (0, 1) for c in gen.random(label, n_per_class, rng)]
    return torch.as_tensor(np.stack([c.image for c in cands])), torch.tensor([c.label for c in cands])


def test_vote_utilities_count_contrastive_votes_by_hand():
    cands = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 9.0]])  # class c's candidates
    rivals = torch.tensor([[2.0, 3.0]])  # the other class's candidates
    private = torch.tensor([[0.5, 0.0], [-1.0, 0.0], [4.0, 0.5], [2.0, 2.5]])
    # images 1-2 vote for candidate 0, image 3 for candidate 1; image 4's nearest own candidate (0 or 1, at 3.2)
    # is farther than the rival (0.5): it does not vote
    assert vote_utilities(cands, rivals, private).tolist() == [2.0, 1.0, 0.0]
    assert vote_utilities(cands, rivals[:0], private).tolist() == [3.0, 1.0, 0.0]  # no rivals: everyone votes
    assert vote_utilities(cands, rivals, private[:0]).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_removing_one_private_image_moves_every_vote_utility_by_at_most_one(seed):
    g = torch.Generator().manual_seed(seed)
    cands, rivals, private = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g), torch.randn(9, 6, generator=g)
    full = vote_utilities(cands, rivals, private)
    assert full.sum() >= 1  # some image voted, so a removal can change something
    for i in range(len(private)):
        without = vote_utilities(cands, rivals, torch.cat([private[:i], private[i + 1 :]]))
        assert (full - without).abs().max() <= 1 and 0 <= (full - without).sum() <= 1
    # and adding any image (here: an exact copy of a candidate) moves one count by one
    added = vote_utilities(cands, rivals, torch.cat([private, cands[3:4]]))
    assert (added - full).tolist() == [0.0] * 3 + [1.0] + [0.0] * 8


def test_pick_frequencies_follow_the_mechanism_on_vote_counts():
    u = torch.tensor([3.0, 1.0, 0.0, 0.0])
    eps = 1.0
    expected = torch.exp(eps * u / 2) / torch.exp(eps * u / 2).sum()
    gen = torch.Generator().manual_seed(1)
    draws = torch.tensor([int(exponential_mechanism(u, eps, 1.0, gen).indices[0]) for _ in range(8000)])
    torch.testing.assert_close(torch.bincount(draws, minlength=4).double() / 8000, expected.double(), atol=0.02, rtol=0)
    assert selectivity(eps, votes=3) == pytest.approx(math.exp(1.5))  # e^{ε·votes/2}


@pytest.mark.parametrize("utility, draws", [("vote", 2), ("paper", 4)])
def test_each_iteration_is_charged_before_its_draws_and_the_run_sums_to_epsilon(utility, draws):
    """vote: the classes' picks read disjoint private images (parallel composition), so an iteration costs
    k draws; paper: every class reads every centre, C·k draws."""
    images, labels = _private()
    config = PCEvolveConfig(epsilon=6.0, iterations=3, candidates=4, per_class=5, picks=2, utility=utility,
                            encoder="pixels")  # fmt: skip
    charged = []
    result = evolve(images, labels, ["normal", "pneumonia"], procedural("cxr", ["normal", "pneumonia"], 16), config,
                    charge=lambda event, it: charged.append((it, event)))  # fmt: skip
    assert [it for it, _ in charged] == [1, 2, 3]
    assert all(e == ExponentialEvent(epsilon=6.0 / (3 * draws), count=draws) for _, e in charged)
    assert sum(e.epsilon * e.count for _, e in charged) == pytest.approx(6.0)
    assert len(result.picks) == 3 and all(len(p) == 2 for p in result.picks[0].values())
    # the released set: per_class children per class, spread over both picks of the last iteration
    assert [c.label for c in result.synthetic] == [0] * 5 + [1] * 5 and result.kept_iteration == 3
    for c, name in enumerate(["normal", "pneumonia"]):
        parents = [x.parent for x in result.synthetic if x.label == c]
        assert sorted(set(parents)) == sorted(result.picks[-1][name]) and max(map(parents.count, set(parents))) == 3
    assert all(c.image.shape == (1, 16, 16) and 0 <= c.image.min() and c.image.max() <= 1 for c in result.synthetic)
    assert 0 < result.diversity < 2


def test_keep_val_scores_each_iteration_on_validation_and_charges_the_choice():
    images, labels = _private()
    val_x, val_y = _private(n_per_class=4, seed=9)
    config = PCEvolveConfig(epsilon=4.0, iterations=3, candidates=4, per_class=3, picks=2, keep="val", keep_epsilon=1.0,
                            encoder="pixels")  # fmt: skip
    charged = []
    result = evolve(images, labels, ["normal", "pneumonia"], procedural("cxr", ["normal", "pneumonia"], 16), config,
                    charge=lambda event, it: charged.append((it, event)), val_images=val_x, val_labels=val_y)  # fmt: skip
    assert [it for it, _ in charged] == [1, 2, 3, 4]
    assert charged[-1][1] == ExponentialEvent(epsilon=1.0) and charged[0][1] == ExponentialEvent(epsilon=0.5, count=2)
    assert sum(e.epsilon * e.count for _, e in charged) == pytest.approx(4.0)
    assert len(result.keep_scores) == 3 and all(0 <= s <= 8 for s in result.keep_scores)
    assert 1 <= result.kept_iteration <= 3
    # without a validation split it refuses rather than falling back to test or train
    with pytest.raises(Exception, match="keep: val needs the site's validation split"):
        evolve(images, labels, ["normal", "pneumonia"], procedural("cxr", ["normal", "pneumonia"], 16), config,
               charge=lambda e, i: None)  # fmt: skip


def test_keep_scores_count_validation_images_a_set_gets_right():
    sets = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
    val = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.2, 0.0]])
    scores = keep_scores(sets, torch.tensor([0, 1]), val, torch.tensor([0, 1, 0]), 2)
    assert scores.tolist() == [3.0, 0.0]


def test_config_refuses_inconsistent_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="picks: 5 exceeds candidates"):
        PCEvolveConfig(epsilon=1.0, candidates=4, picks=5)
    with pytest.raises(ValidationError, match="keep_epsilon: 2 leaves nothing"):
        PCEvolveConfig(epsilon=2.0, keep="val", keep_epsilon=2.0)
    with pytest.raises(ValidationError, match="needs iterations ≥ 2"):
        PCEvolveConfig(epsilon=2.0, keep="val", iterations=1)


def test_a_class_without_private_images_is_refused():
    images, labels = _private()
    with pytest.raises(Exception, match="no private training image of class pneumonia"):
        evolve(images[labels == 0], labels[labels == 0], ["normal", "pneumonia"],
               procedural("cxr", ["normal", "pneumonia"], 16), PCEvolveConfig(epsilon=1.0), charge=lambda e, i: None)  # fmt: skip


def test_generator_never_touches_files_and_ignores_private_data(monkeypatch):
    gen = procedural("pathology", ["normal", "tumor"], 16)
    first = gen.random(1, 2, np.random.default_rng(3))

    def refuse(*args, **kwargs):
        raise AssertionError("the generator opened a file")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(pydicom, "dcmread", refuse)
    again = gen.random(1, 2, np.random.default_rng(3))
    varied = gen.variation(again[0], 0.7, 3, np.random.default_rng(4))
    monkeypatch.undo()
    # what it draws depends only on the class, its own earlier candidate and the seed
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert [v.label for v in varied] == [1, 1, 1] and all(0.5 <= v.recipe["atypia"] <= 1.0 for v in varied)
    small = gen.variation(again[0], 0.05, 1, np.random.default_rng(5))[0]
    big = gen.variation(again[0], 1.0, 1, np.random.default_rng(5))[0]
    assert abs(small.recipe["atypia"] - again[0].recipe["atypia"]) < abs(big.recipe["atypia"] - again[0].recipe["atypia"])


def test_the_budget_cap_refuses_a_run_before_any_selection(tmp_path, monkeypatch):
    ensure_simulation_pki(tmp_path, ["hospital-1"])
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path))
    policy = PrivacyPolicy(budget=Budget(epsilon=5.0, delta=1e-5))
    party = Party("hospital-1", ".")
    book = BudgetBook("hospital-1", party.ledger(), policy.budget, root_ca=party.root_ca)
    charge = SelectionCharge(book, "run-1", {"generator": "procedural"})
    charge.admit([ExponentialEvent(epsilon=0.5, count=2)] * 3)  # pure ε 3 fits
    for it in (1, 2, 3):
        charge(ExponentialEvent(epsilon=0.5, count=2), it)
    with pytest.raises(BudgetExceeded):  # another 3 would pass ε = 5
        SelectionCharge(book, "run-2", {}).admit([ExponentialEvent(epsilon=0.5, count=2)] * 3)
    ledger = entries(tmp_path / "hospital-1" / LEDGER_FILE)
    assert [e["event"] for e in ledger] == ["synthetic_release"] * 3 + ["refusal"]
    assert ledger[-1]["job"] == "run-2" and ledger[-1]["what"]["sent"] is False
    assert ledger[2]["privacy"]["pure_epsilon"] == 1.0 and ledger[2]["privacy"]["cumulative_epsilon"] < 5.0


@pytest.fixture(scope="module")
def scarce(tmp_path_factory):
    out = tmp_path_factory.mktemp("pce") / "cxr"
    req = SynthRequest("cxr", sites=2, images_per_site=40, seed=2, scarce={"hospital-2": 6})
    return synthesize(out, req, workers=1, progress=False)


def test_medsilo_pcevolve_writes_valid_images_a_manifest_and_ledger_entries(scarce, tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["pcevolve", "--sites", str(scarce), "--site", "hospital-2", "--out", str(out), "--epsilon", "4",
            "--iterations", "2", "--candidates", "4", "--picks", "2", "--per-class", "3", "--image-size", "16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    manifest = read_manifest(out / "manifest.csv", allow_outside=True)  # its own rows name the site's images
    synthetic = [r for r in manifest.rows if r.source == "pcevolve"]
    assert len(synthetic) == 6 and {r.split for r in synthetic} == {"train"}
    assert sorted(r.label for r in synthetic) == [0, 0, 0, 1, 1, 1]
    ds = pydicom.dcmread(synthetic[0].path)
    assert ds.Modality == "CR" and ds.PatientIdentityRemoved == "YES"
    data = load_site_data(manifest, modality="cxr", image_size=16)  # the site pipeline reads them
    own = sum(1 for r in manifest.rows if r.split == "train" and not r.source)
    assert len(data.train) == own + 6
    summary = json.loads((out / "pcevolve.json").read_text())
    assert summary["epsilon_per_pick"] == pytest.approx(1.0) and summary["images"] == 6  # 4 / (T·k), classes parallel
    assert summary["encoder"] == "pretrained" and summary["utility"] == "vote" and summary["kept_iteration"] == 2
    assert summary["encoder_sha256"] == WEIGHTS_SHA256 and summary["diversity"] > 0
    ledgers = scarce.parent / "ledgers"
    releases = [e for e in entries(ledgers / "hospital-2" / LEDGER_FILE) if e["event"] == "synthetic_release"]
    assert [e["round"] for e in releases] == [1, 2]
    assert all(e["what"]["encoder"] == "pretrained" and e["what"]["encoder_sha256"] == WEIGHTS_SHA256
               and e["what"]["utility"] == "vote" and e["what"]["composition"] == "parallel over classes"
               and e["privacy"]["pure_epsilon"] == pytest.approx(2.0) for e in releases)  # fmt: skip
    assert verify([ledgers / "hospital-2" / LEDGER_FILE], root_ca=ledgers / "pki" / "rootCA.pem") == []
    # the same folder again: refused, nothing overwritten
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


@pytest.fixture
def image_service():
    """A real HTTP image service on localhost speaking the generator protocol (backed by the procedural one)."""
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    backend = procedural("cxr", ["normal", "pneumonia"], 16)
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            label = ["normal", "pneumonia"].index(body["label"])
            cands = backend.random(label, body["n"], np.random.default_rng(body["seed"]))
            out = []
            for c in cands:
                buf = io.BytesIO()
                Image.fromarray(np.rint(c.image[0] * 255).astype(np.uint8), "L").save(buf, format="PNG")
                out.append(base64.b64encode(buf.getvalue()).decode())
            data = json.dumps({"images": out}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_http_generator_speaks_the_protocol_and_sends_only_prompts_and_picks(image_service):
    from medsilo.medical.synth.pcevolve.generators import make_generator

    url, seen = image_service
    images, labels = _private()
    gen = make_generator(url, "cxr", ["normal", "pneumonia"], 16)
    config = PCEvolveConfig(epsilon=4.0, iterations=2, candidates=3, per_class=3, picks=1, encoder="pixels")
    result = evolve(images, labels, ["normal", "pneumonia"], gen, config, charge=lambda e, i: None)
    assert [c.label for c in result.synthetic] == [0, 0, 0, 1, 1, 1]
    assert all(c.image.shape == (1, 16, 16) for c in result.synthetic)
    assert [r["path"] for r in seen] == ["/random", "/random"] + ["/variation"] * 4
    assert {k for r in seen for k in r} == {"path", "prompt", "label", "n", "size", "seed", "image", "strength"}
    assert seen[0]["prompt"] == "A chest radiography (X-ray) image with" and seen[1]["prompt"].endswith("pneumonia")
    assert [r["strength"] for r in seen[2:]] == pytest.approx([0.78, 0.78, 0.76, 0.76])
    private_bytes = {images[i].numpy().tobytes() for i in range(len(images))}
    assert not any(c.image.tobytes() in private_bytes for c in result.synthetic)


def test_http_and_torchscript_generators_fail_with_the_endpoint_or_file_named(tmp_path):
    from medsilo.errors import MedsiloError
    from medsilo.medical.synth.pcevolve.generators import make_generator

    dead = make_generator("http://127.0.0.1:9", "cxr", ["normal", "pneumonia"], 16)
    with pytest.raises(MedsiloError, match=r"http://127.0.0.1:9/random"):
        dead.random(0, 2, np.random.default_rng(0))
    with pytest.raises(MedsiloError, match=r"missing.pt: cannot load"):
        make_generator(f"torchscript:{tmp_path / 'missing.pt'}", "cxr", ["normal", "pneumonia"], 16)
    with pytest.raises(MedsiloError, match="use procedural"):
        make_generator("stable-diffusion", "cxr", ["normal", "pneumonia"], 16)


def test_torchscript_generator_runs_a_site_supplied_model(tmp_path):
    from medsilo.errors import MedsiloError
    from medsilo.medical.synth.pcevolve.generators import make_generator

    class Tiny(torch.nn.Module):
        @torch.jit.export
        def random(self, label: int, n: int, seed: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(n, 1, 16, 16, generator=g) * 0.5 + 0.5 * label

        @torch.jit.export
        def variation(self, image: torch.Tensor, strength: float, n: int, seed: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return (image + strength * 0.1 * torch.randn(n, 1, 16, 16, generator=g)).clamp(0, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "gen.pt"
    torch.jit.script(Tiny()).save(str(path))
    gen = make_generator(f"torchscript:{path}", "cxr", ["normal", "pneumonia"], 16)
    first = gen.random(1, 3, np.random.default_rng(0))
    assert len(first) == 3 and all(c.image.min() >= 0.5 for c in first)
    kids = gen.variation(first[0], 0.6, 2, np.random.default_rng(1))
    assert [c.label for c in kids] == [1, 1] and kids[0].image.shape == (1, 16, 16)
    wrong = make_generator(f"torchscript:{path}", "cxr", ["normal", "pneumonia"], 32)  # the model makes 16²
    with pytest.raises(MedsiloError, match=r"returned shape \(2, 1, 16, 16\), expected \(2, 1, 32, 32\)"):
        wrong.random(0, 2, np.random.default_rng(0))


def test_procedural_cxr_spans_the_acquisition_chain_so_picks_can_steer_it():
    """Random candidates differ in scanner (marker corner, heel, grid, collimation, matrix); a weak variation
    keeps its parent's scanner, a strong one may move it — within the reference scanners' ranges."""
    from medsilo.medical.synth.pcevolve.generators import _RESPONSE_SPREAD

    gen = procedural("cxr", ["normal", "pneumonia"], 24)
    cands = gen.random(1, 24, np.random.default_rng(0))
    responses = [c.recipe["response"] for c in cands]
    assert len({r["marker_corner"] for r in responses}) == 4
    assert all(lo <= r[k] <= hi for r in responses for k, (lo, hi) in _RESPONSE_SPREAD.items())
    assert all(c.image.shape == (1, 24, 24) and 0 <= c.image.min() and c.image.max() <= 1 for c in cands)
    parent = cands[0]
    weak = gen.variation(parent, 0.05, 6, np.random.default_rng(1))
    strong = gen.variation(parent, 1.0, 6, np.random.default_rng(1))
    spread = {k: hi - lo for k, (lo, hi) in _RESPONSE_SPREAD.items()}

    def moved(kids):
        return max(abs(k.recipe["response"][key] - parent.recipe["response"][key]) / spread[key]
                   for k in kids for key in spread)  # fmt: skip

    assert moved(weak) < 0.2 < moved(strong)
    assert {k.recipe["response"]["marker_corner"] for k in weak} == {parent.recipe["response"]["marker_corner"]}
    assert all(k.label == 1 for k in weak + strong)
