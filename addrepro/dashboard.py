"""``python -m addrepro.dashboard <sweep folder | job folder>``: a W&B workspace for a sweep or a run.

Offline (the default) it writes the workspace as ``wandb_workspace.json`` into the folder and prints
the commands that sync the runs and publish it. ``--online`` publishes it at once (the runs must be
in W&B already) and prints its URL; ``--publish <wandb_workspace.json>`` publishes a saved one. What
the workspace holds: ``addrepro.reports.dashboard``. Needs ``pip install "addrepro[dashboard]"``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from addrepro.reports.dashboard import (
    WORKSPACE_JSON,
    plan_sections,
    read_target,
    to_workspace,
    unsynced_jobs,
    workspace_from_json,
    write_workspace,
)
from addrepro.rundir.metrics_file import RunFileError

MISSING_EXTRA = 'addrepro.dashboard: needs wandb-workspaces: pip install "addrepro[dashboard]"'


def publish(workspace) -> str:  # noqa: ANN001 - a Workspace
    """Save the workspace to W&B (needs ``wandb login``) and return its URL."""
    if not workspace.entity:
        import wandb  # noqa: PLC0415 - only publishing needs the W&B API

        workspace.entity = wandb.Api().default_entity
    return workspace.save().url


def saved_workspace(path: Path, entity: str | None):  # noqa: ANN201 - a Workspace
    """The workspace ``path`` holds; ``RunFileError`` naming the file when it is not one this command wrote."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():  # a folder, a pipe (would block), a device (/dev/zero never ends)
        raise RunFileError(f"{path} is not a regular file")
    try:
        spec = json.loads(path.read_text())
        return workspace_from_json(spec, entity=entity)
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:  # JSON, then the workspace schema
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} is not a workspace file written by addrepro.dashboard ({reason})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m addrepro.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="a sweep folder or a job folder")
    parser.add_argument("--online", action="store_true", help="publish the workspace now and print its URL")
    parser.add_argument("--publish", type=Path, metavar="JSON", help=f"publish a saved {WORKSPACE_JSON}")
    parser.add_argument("--entity", help="W&B entity (default: the run config's, else your default entity)")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.publish is None):
        parser.print_usage(sys.stderr)
        print("addrepro.dashboard: give a folder, or --publish <json>", file=sys.stderr)
        return 2
    if args.entity is not None and (not args.entity.strip() or any(c in args.entity for c in "/\\#?%: ")):
        print(
            f"addrepro.dashboard: --entity {args.entity!r} is not a W&B name: not empty, without / \\ # ? % : "
            "or spaces",
            file=sys.stderr,
        )
        return 2
    try:
        if args.publish is not None:
            print(publish(saved_workspace(args.publish, args.entity)))
            return 0
        target = read_target(args.folder)
        if not target.logged_to_wandb:  # a workspace of these runs would show nothing
            raise RunFileError(
                f"the runs in {target.folder} did not log to W&B (logger.wandb.enabled=false): no dashboard to "
                f"build; their plots are redrawn by python -m addrepro.report {target.folder}"
            )
        missing = unsynced_jobs(target)
        if missing and len(missing) == len(target.jobs):
            raise RunFileError(f"no offline W&B run to sync in {target.folder} (wandb/offline-run-* of its jobs)")
        workspace = to_workspace(target, plan_sections(target), entity=args.entity)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("wandb_workspaces"):
            print(MISSING_EXTRA, file=sys.stderr)
            return 2
        raise
    except (FileNotFoundError, RunFileError) as e:
        print(f"addrepro.dashboard: {e}", file=sys.stderr)
        return 2
    try:
        path = write_workspace(target.folder, workspace)
    except OSError as e:  # a read-only copy of a sweep
        print(
            f"addrepro.dashboard: cannot write the workspace file in {target.folder}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 2
    print(f"workspace of W&B group {target.group}: {path}")
    if missing:
        names = ", ".join(job.name for job in missing[:3]) + (" …" if len(missing) > 3 else "")
        print(f"addrepro.dashboard: {len(missing)} job(s) have no offline W&B run to sync: {names}", file=sys.stderr)
    if args.online:
        print(publish(workspace))
        return 0
    jobs = "" if target.jobs == [target.folder] else "/*"
    sync = f"wandb sync {shlex.quote(str(target.folder))}{jobs}/wandb/offline-run-*"
    print("publish it once the runs are in W&B (wandb login first):")
    print(f"  {sync}")
    print(f"  python -m addrepro.dashboard --publish {shlex.quote(str(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
