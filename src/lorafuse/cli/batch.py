"""``lorafuse batch MANIFEST``: run the merge/extract/verify/combine/convert jobs of a manifest (docs/fleets.md)."""

from __future__ import annotations

import argparse
import json


def add_args(p: argparse.ArgumentParser) -> None:
    from ..batch.executors import EXECUTORS

    p.add_argument("manifest", help="a JSON or YAML file of jobs with the commands' options (docs/fleets.md)")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="local processes (default) or Ray tasks")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="jobs at once (default: local, the usable CPUs; ray, as Ray schedules)",
    )
    p.add_argument("--address", default=None, help="the Ray cluster (with --executor ray; default: RAY_ADDRESS)")
    p.add_argument("--retries", type=int, default=1, help="tries again after a failure, per job (default 1)")
    p.add_argument("--report", default=None, help="the JSON report (default: MANIFEST.report.json beside it)")
    p.add_argument("--rerun", action="store_true", help="run every job, even those a previous run finished")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    """Run the jobs of a manifest on local processes or a Ray cluster, resuming a previous run."""
    from ..batch.runner import render_batch, run_batch
    from ..errors import LorafuseError
    from . import progress

    if args.retries < 0 or (args.workers is not None and args.workers < 1):
        raise LorafuseError("--retries is 0 or more and --workers 1 or more")
    report = run_batch(
        args.manifest,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        retries=args.retries,
        report_path=args.report,
        rerun=args.rerun,
        show_progress=progress(args),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(render_batch(report)))
    return 1 if report.failed else 0
