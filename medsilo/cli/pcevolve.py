"""``medsilo pcevolve``: differentially private synthetic images for a scarce site (PCEvolve).

The site is named by its own config (``--site-config local/medsilo_site.yml``, deployed) or by its entry
in a simulation's ``sites.yml`` (``--sites FILE --site NAME``); its dataset's manifest, modality and
privacy policy (budget cap) come from there. The run reads the **train** split only, charges its
selections to the site's DP budget in the site's privacy ledger (``synthetic_release`` entries; the
whole run is refused before any selection when it cannot fit), and writes into ``--out``:

* ``images/`` — the synthetic images (CR DICOM for chest X-ray, PNG for pathology);
* ``manifest.csv`` — the site's manifest plus one ``train`` row per synthetic image, ``source`` =
  ``pcevolve``, so it can replace the dataset's manifest in the site config (its rows name the site's own
  images outside ``--out``, so that config needs ``data.allow_paths_outside_manifest: true``);
* ``pcevolve.json`` — the settings, the encoder (with its weights' SHA-256) and utility, ε per draw and in
  total, which iteration was kept, and the released set's diversity.

Everything is written to a temporary folder and renamed at the end: an interrupted or refused run
leaves no half result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from medsilo.errors import MedsiloError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pcevolve", help="DP synthetic images for a scarce site (PCEvolve)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))  # fmt: skip
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--site-config", type=Path, metavar="FILE", help="the site's local/medsilo_site.yml")
    where.add_argument("--sites", type=Path, metavar="SITES.yml", help="a simulation's sites.yml (with --site)")
    p.add_argument("--site", help="the site's name in --sites")
    p.add_argument("--dataset", help="dataset name in the site's config (default: its only one)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new folder for images and manifest")
    p.add_argument("--epsilon", type=float, required=True, help="total pure ε of the run's selections")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--candidates", type=int, default=16, help="candidates per class and iteration")
    p.add_argument("--picks", type=int, default=8, help="candidates picked per class and iteration")
    p.add_argument("--per-class", type=int, default=16, help="synthetic images written per class")
    p.add_argument("--utility", choices=["vote", "paper"], default="vote",
                   help="vote: each private image votes for its nearest candidate (default); paper: the published "
                        "centre-distance utility")  # fmt: skip
    p.add_argument("--keep", choices=["last", "val"], default="last",
                   help="release the last iteration's images, or the iteration chosen privately on the validation "
                        "split (at --keep-epsilon, part of --epsilon)")  # fmt: skip
    p.add_argument("--keep-epsilon", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=10.0, help="calibration sharpness of --utility paper")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--encoder", choices=["pretrained", "random-cnn", "pixels"], default="pretrained",
                   help="pretrained: ImageNet EfficientNet-Lite0 (pinned wheel, default); random-cnn, pixels: baselines")
    p.add_argument("--generator", default="procedural",
                   help="procedural (offline, default), an http(s):// endpoint, or torchscript:PATH; the site's "
                        "privacy.pcevolve_generators must allow it")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # `--sites` points the simulated site's ledger at `medsilo sim`'s folder through the environment, for this
    # command only: put back as it was, so nothing leaks into a caller's process (tests run commands in-process)
    from medsilo.secure.keys import LEDGER_DIR_ENV

    before = os.environ.get(LEDGER_DIR_ENV)
    try:
        return _run(args)
    finally:
        if before is None:
            os.environ.pop(LEDGER_DIR_ENV, None)
        else:
            os.environ[LEDGER_DIR_ENV] = before


def _run(args: argparse.Namespace) -> int:
    from medsilo.config.loading import validate
    from medsilo.medical.synth.pcevolve.evolve import PCEvolveConfig

    names = ("epsilon", "iterations", "candidates", "picks", "per_class", "utility", "keep", "keep_epsilon", "tau",
             "encoder", "seed")  # fmt: skip
    config = validate({k: getattr(args, k) for k in names}, PCEvolveConfig, "medsilo pcevolve options")
    if not math.isfinite(config.epsilon):
        raise MedsiloError("--epsilon: must be finite (ε = inf releases the selection without privacy)")
    site, ref, policy, data_policy, workspace = _site(args)
    if args.out.exists():
        raise MedsiloError(f"--out {args.out}: already exists; choose a new folder (nothing was overwritten)")
    if args.generator not in policy.pcevolve_generators:
        raise MedsiloError(f"site {site}: generator '{args.generator}' is not in the site's privacy.pcevolve_generators "
                           f"({', '.join(policy.pcevolve_generators) or 'none'})")  # fmt: skip
    result = run_pcevolve(site, ref.manifest, ref.modality, policy, workspace, config, args.out,
                          image_size=args.image_size, generator_name=args.generator,
                          progress=not args.no_progress,
                          allow_outside=data_policy.allow_paths_outside_manifest)  # fmt: skip
    print(f"wrote {result['images']} synthetic images and {args.out / 'manifest.csv'}; ε = {config.epsilon:g} "
          f"(ε per draw {result['epsilon_per_pick']:.3g}; {config.utility} utility, {config.encoder} encoder; "
          f"kept iteration {result['kept_iteration']} of {config.iterations})")  # fmt: skip
    print(f"note: its rows for the site's own images point outside {args.out}; a site config that trains "
          "with it needs data.allow_paths_outside_manifest: true")
    return 0


def _site(args: argparse.Namespace):
    """(site name, dataset ref, privacy policy, data policy, workspace) from its config or ``sites.yml``."""
    from medsilo.config.site import load_site_config, load_sites_file
    from medsilo.medical.data.pacs import local_dataset
    from medsilo.secure.keys import LEDGER_DIR_ENV, ensure_simulation_pki

    if args.sites:
        if not args.site:
            raise MedsiloError("--sites needs --site NAME")
        sites = load_sites_file(args.sites)
        configs = sites.site_configs()
        if args.site not in configs:
            raise MedsiloError(f"{args.sites}: no site {args.site!r}; sites: {', '.join(configs)}")
        config = configs[args.site]
        ledgers = args.sites.resolve().parent / "ledgers"  # where `medsilo sim` keeps the simulated sites' ledgers
        ensure_simulation_pki(ledgers, list(configs))
        os.environ[LEDGER_DIR_ENV] = str(ledgers)
        workspace = ledgers
    else:
        config = load_site_config(args.site_config)
        workspace = args.site_config.resolve().parent.parent  # <workspace>/local/medsilo_site.yml
    names = list(config.datasets)
    name = args.dataset or (names[0] if len(names) == 1 else None)
    if name is None or name not in config.datasets:
        raise MedsiloError(f"site {config.site}: choose --dataset from {', '.join(names)}")
    ref = local_dataset(config.datasets[name], progress=not args.no_progress)  # PACS: its cache's manifest
    return config.site, ref, config.privacy, config.data, workspace


def run_pcevolve(site: str, manifest_file: Path, modality: str, policy, workspace: Path, config, out: Path, *,
                 image_size: int, generator_name: str = "procedural", progress: bool = True,
                 allow_outside: bool = False) -> dict:  # fmt: skip
    """Run PCEvolve on a site's train split and write ``out`` (module docstring); returns the summary.

    ``allow_outside`` is the site's ``data.allow_paths_outside_manifest`` (see :func:`read_manifest`).
    """
    from tqdm import tqdm

    from medsilo.config.manifest import read_manifest
    from medsilo.medical.data import load_site_data
    from medsilo.medical.synth.pcevolve.evolve import charged_evolve, encoder_identity
    from medsilo.medical.synth.pcevolve.store import write_synthetic
    from medsilo.secure.keys import Party

    manifest = read_manifest(manifest_file, allow_outside=allow_outside)
    data = load_site_data(manifest, modality=modality, image_size=image_size, progress=progress)
    classes = manifest.classes
    run_id = f"pcevolve-{time.strftime('%Y%m%dT%H%M%S')}"
    party = Party(site, workspace)
    facts = encoder_identity(config.encoder)
    val = data.val if config.keep == "val" else None
    bar = tqdm(total=config.iterations, desc=f"pcevolve {site}", unit="it", disable=not progress, leave=False)
    result = charged_evolve(party, run_id, policy, generator_name, modality, classes, image_size,
                            data.train.images, data.train.labels, config, progress=lambda i, n: bar.update(1),
                            encoder_facts=facts, val_images=None if val is None else val.images,
                            val_labels=None if val is None else val.labels)  # fmt: skip
    bar.close()
    summary = {"site": site, "run": run_id, "settings": config.model_dump(), "image_size": image_size, **facts,
               "utility": config.utility, "epsilon_total": config.epsilon,
               "epsilon_per_pick": result.epsilon_per_pick,
               "composition": "parallel over classes" if config.utility == "vote" else "sequential",
               "kept_iteration": result.kept_iteration, "images": len(result.synthetic),
               "diversity": result.diversity}  # fmt: skip
    write_synthetic(out, manifest, result.synthetic, modality, site,
                    extra={"pcevolve.json": json.dumps(summary, indent=2) + "\n"})  # fmt: skip
    return summary
