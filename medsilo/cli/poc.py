"""``medsilo poc up|submit|down``: a real NVFlare deployment (server + one process per site) on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "poc",
        help="real server and site processes on this machine; submit through the admin API",
        description="Provision, start, use and stop a one-machine NVFlare deployment (POC) of synthetic or local hospitals.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    up = verbs.add_parser("up", help="provision and start server and sites; wait until all are connected",
                          description="Provision kits for the sites of SITES.yml (free port, admin, auditor, CKKS keys; by "
                                      "default every party's distributed-provisioning steps, each in its own folder), "
                                      "write each site's config from its entry, start every party as its own process "
                                      "and wait until all sites are connected.")  # fmt: skip
    up.add_argument("--data", type=Path, required=True, metavar="SITES.yml", help="sites.yml (as from 'medsilo synth')")
    up.add_argument("--workspace", type=Path, required=True, metavar="W", help="POC workspace folder")
    up.add_argument("--sites", type=int, default=None, metavar="N", help="use the first N sites (default: all)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for server and sites")
    up.add_argument("--custody", choices=("sites", "central"), default="sites",
                    help="sites (default): every party makes its own keys (distributed provisioning, run here); "
                         "central: one trusting provisioning run makes every key")  # fmt: skip
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=run_up)

    submit = verbs.add_parser("submit", help="submit a job spec through the admin API, wait, download, report",
                              description="Export SPEC as an NVFlare job, submit it with the admin kit, follow it, "
                                          "download the result and write results.json and report.html.")  # fmt: skip
    submit.add_argument("spec", type=Path, help="job spec YAML")
    submit.add_argument("--workspace", type=Path, required=True, metavar="W")
    submit.add_argument("--as", dest="user", default=None, metavar="USER",
                        help="admin identity whose kit submits (default: the project admin)")  # fmt: skip
    submit.add_argument("--out", type=Path, default=None, metavar="RUN_DIR", help="default: W/runs/<job name>")
    submit.add_argument("--rounds", type=int, default=None, help="override the spec's training.rounds")
    submit.add_argument("--timeout", type=float, default=1800.0, help="seconds before the job is aborted")
    submit.add_argument("--resume", action="store_true",
                        help="continue from the last round an interrupted run of this job checkpointed")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=run_submit)

    down = verbs.add_parser("down", help="stop every process of the workspace and check none is left",
                            description="Shut the system down through the admin API, then stop anything of W left.")
    down.add_argument("--workspace", type=Path, required=True, metavar="W")
    down.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    from medsilo.provisioning.poc import up

    state = up(args.data, args.workspace, args.sites, progress=not args.quiet, timeout=args.timeout,
               custody=args.custody)  # fmt: skip
    print(f"POC up ({state['custody']} custody): server on localhost:{state['port']}, sites {', '.join(state['sites'])}")
    print(f"  admin kit   {state['kits']}/{state['admin']}")
    print(f"  auditor kit {state['kits']}/{state['auditor']}")
    print(f"submit with: medsilo poc submit SPEC.yml --workspace {args.workspace}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from medsilo.cli.sim import with_rounds
    from medsilo.cli.summary import print_summary
    from medsilo.config import load_job_spec
    from medsilo.jobs.deploy import run_deployed
    from medsilo.jobs.simulate import check_model_map
    from medsilo.provisioning.poc import admin_session, load_state
    from medsilo.report import write_report

    spec = with_rounds(load_job_spec(args.spec), args.rounds)
    workspace = args.workspace.resolve()
    state = load_state(workspace)
    check_model_map(spec, state["sites"])  # the sites check their own policies when the job reaches them
    with admin_session(workspace, args.user) as sess:
        results = run_deployed(
            spec, sess, job_root=workspace / "jobs", run_dir=args.out or workspace / "runs" / spec.name,
            min_sites=spec.reliability.min_sites or len(state["sites"]),
            server_workspace=Path(state["kits"]) / "server", progress=not args.quiet, timeout=args.timeout,
            resume=args.resume,
        )  # fmt: skip
    print_summary([results])
    out = args.out or workspace / "runs" / spec.name
    write_report([results], out / "report.html", title=f"{spec.name} (job {results['job_id']})")
    print(f"job {results['job_id']} completed; wrote {out / 'results.json'} and {out / 'report.html'}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from medsilo.provisioning.poc import down

    left = down(args.workspace)
    if left:
        print(f"medsilo: error: processes of {args.workspace} still alive: {', '.join(map(str, left))}")
        return 1
    print(f"POC down: no process of {args.workspace} left")
    return 0
