"""A W&B workspace for a sweep or a single run, built from its folder alone.

What the workspace holds is decided here in plain data (``plan_sections``); ``to_workspace`` turns it
into a ``wandb_workspaces`` workspace (the optional extra ``addrepro[dashboard]``), which is saved as
JSON beside the sweep and published to W&B once the runs are synced.

* Runs: those of the sweep's (or run's) W&B group, grouped by the swept config keys, so every panel
  draws one line per swept value (the mean over seeds when a sweep also varies the seed).
* Sections, in the order a reader goes through them: per-place loss (one panel per place, carry-out
  first, log y, the atlas levels of the task in the title and as a table), per-place accuracy,
  naive-sum and depth-sum probabilities, the carry-in and chain-length sets, the mechanism metrics
  (each head's attention on own and lower operands per place, the carry-in probes), gradient norms,
  and the detected shelves (the ``shelves`` table each run logs at its end).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from addrepro.reports.job import GUIDE_LEVELS, place_atlas
from addrepro.reports.plots import place_label
from addrepro.reports.sweep import swept_values
from addrepro.rundir.checkpoints import CheckpointError, load_checkpoint
from addrepro.rundir.job import is_job_dir, job_config, job_dirs
from addrepro.rundir.metrics_file import RunFileError, load_rows
from addrepro.rundir.names import grid_keys, swept_keys, wandb_group
from addrepro.shelves.atlas import format_atlas_table, shelf_atlas
from addrepro.task.spec import TaskSpec

WORKSPACE_JSON = "wandb_workspace.json"
STEP = "trainer/global_step"  # the step key Lightning's W&B logger writes with every row
SECTIONS = (
    "Per-place loss",
    "Per-place accuracy",
    "Naive-sum and depth-sum probabilities",
    "Carry-in, chain-length and carry-complexity sets",
    "Mechanism: attention and carry probes",
    "Gradient norms",
    "Detected shelves",
)
GRAD_GROUPS = ("embed", "attn", "mlp", "ln", "unembed")


@dataclass
class Target:
    """A sweep folder (or one job folder) and what its W&B runs share."""

    folder: Path
    jobs: list[Path]
    project: str
    entity: str | None
    group: str
    swept: list[str]  # config keys the sweep varies, in the order they were given
    spec: TaskSpec
    logged: set[str] | None  # metric keys in the jobs' CSV files; None when there are none
    run_id: str | None = None  # a single job's W&B run id: its workspace shows that run alone
    logged_to_wandb: bool = True  # False when the jobs ran with W&B switched off
    offline: bool = True  # the jobs logged offline: their runs are synced from ``<job>/wandb/offline-run-*``


@dataclass
class Panel:
    """One line-plot panel (or, with ``markdown`` or ``table``, a text or table panel)."""

    title: str
    y: list[str] = field(default_factory=list)
    y_label: str = ""
    log_y: bool = False
    y_range: tuple[float | None, float | None] = (None, None)
    markdown: str | None = None
    table: str | None = None


@dataclass
class Section:
    name: str
    panels: list[Panel]


# -- reading the folder -----------------------------------------------------------------------
def sweep_swept_keys(sweep_dir: Path) -> list[str]:
    """Keys the multirun swept, from its saved ``multirun.yaml``: the sweep config's grid
    (``+sweep=width``) and the command line's own sweeps (``model.width=32,64``)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise RunFileError(f"{path} is not a regular file")
    try:
        saved = OmegaConf.load(path)
        grid = OmegaConf.select(saved, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(grid, resolve=False) if grid is not None else {}
        task = [str(o) for o in OmegaConf.select(saved, "hydra.overrides.task", default=[])]
        if not isinstance(params, dict):
            raise ValueError("hydra.sweeper.params is not a mapping")
    except Exception as e:  # noqa: BLE001 - YAML, OmegaConf and type errors: all mean a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(
            f"{path} is not the multirun.yaml Hydra writes ({reason}); remove it to group the runs by the "
            "values that differ between their configs"
        ) from None
    swept = swept_keys(task)
    from_task = [key for key in (o.split("=", 1)[0].lstrip("+~") for o in task) if key in swept]
    return list(dict.fromkeys(grid_keys(params) + from_task))


WANDB_KEYS = {
    "project": (str,),
    "entity": (str, type(None)),
    "group": (str, type(None)),
    "enabled": (bool,),
    "mode": (str,),
}


def wandb_settings(job: Path, cfg: Any) -> dict[str, Any]:
    """The job's ``logger.wandb`` settings the workspace needs; ``RunFileError`` naming the config file
    when they were edited into something a run could not have logged with."""
    where = Path(job) / ".hydra" / "config.yaml"
    section = OmegaConf.select(cfg, "logger.wandb", default=None, throw_on_resolution_failure=False)
    if not OmegaConf.is_dict(section):
        raise RunFileError(f"{where} has no logger.wandb section, so its W&B runs cannot be named")
    settings = {}
    for key, kinds in WANDB_KEYS.items():
        value = OmegaConf.select(section, key, default=None, throw_on_resolution_failure=False)
        if OmegaConf.is_config(value) or not isinstance(value, kinds):
            allowed = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise RunFileError(f"{where}: logger.wandb.{key} is {value!r}, expected {allowed}")
        settings[key] = value
    return settings


def job_identity(job: Path, cfg: Any, multirun: bool) -> tuple[str, str | None]:
    """The W&B group a job logged to and its run id (None when unknown). The group is the configured
    one, else the one its checkpoint recorded (it survives the folder being moved), else the one the
    folder's name gives."""
    try:
        ckpt = load_checkpoint(job)
    except CheckpointError:
        ckpt = {}
    group = wandb_settings(job, cfg)["group"] or ckpt.get("wandb_group")
    return group or wandb_group(job.parent if multirun else job, multirun), ckpt.get("wandb_run_id")


def read_target(folder: Path) -> Target:
    """The sweep (or single job) in ``folder``; raises FileNotFoundError when it is neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    if is_job_dir(folder):
        jobs, multirun = [folder], False
    else:
        jobs, multirun = job_dirs(folder), True
        if not jobs:
            raise FileNotFoundError(f"{folder} is neither a job folder nor a sweep folder of job folders")
    configs = [job_config(job) for job in jobs]
    settings = [wandb_settings(job, cfg) for job, cfg in zip(jobs, configs, strict=True)]
    for job, cfg in zip(jobs, configs, strict=True):
        try:
            spec = TaskSpec.from_config(cfg.data)
        except (ValueError, TypeError, KeyError, AttributeError, OmegaConfBaseException) as e:
            raise RunFileError(f"{job / '.hydra' / 'config.yaml'}: its data section is not a task ({e})") from None
    spec = TaskSpec.from_config(configs[0].data)
    if multirun and (folder / "multirun.yaml").exists():
        keys = sweep_swept_keys(folder)
    else:  # a W&B sweep's folder (no multirun.yaml): the keys whose value differs between jobs
        keys = swept_values(jobs, configs)[0] if multirun else []
    # Only config values can group runs; a swept config group (experiment=...) is in the run names.
    swept = [k for k in keys if not k.startswith("hydra") and _is_leaf(configs[0], k)]
    logged: set[str] = set()
    for job in jobs:
        try:
            logged.update(*load_rows(job))
        except FileNotFoundError:
            continue
    cfg = configs[0]
    group, run_id = job_identity(jobs[0], cfg, multirun)
    return Target(
        folder=folder,
        jobs=jobs,
        project=settings[0]["project"],
        entity=settings[0]["entity"],
        group=group,
        swept=swept,
        spec=spec,
        logged=(logged - {"step"}) or None,
        run_id=None if multirun else run_id,
        logged_to_wandb=any(s["enabled"] and s["mode"] != "disabled" for s in settings),
        offline=any(s["enabled"] and s["mode"] == "offline" for s in settings),
    )


def unsynced_jobs(target: Target) -> list[Path]:
    """Jobs of an offline target without an offline W&B run to sync (deleted, or ``wandb`` not a folder)."""
    if not (target.logged_to_wandb and target.offline):
        return []
    return [job for job in target.jobs if not any(p.is_dir() for p in (job / "wandb").glob("offline-run-*"))]


def _is_leaf(cfg: Any, key: str) -> bool:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    return value is not None and not OmegaConf.is_config(value)


# -- what the workspace shows -----------------------------------------------------------------
def atlas_note(levels: dict[str, float]) -> str:
    """The guide levels of one place, for a panel title: ``uniform 2.3 · naive_sum 0.688 · …``."""
    shown: dict[str, float] = {}
    for name in GUIDE_LEVELS:
        value = levels.get(name, 0.0)
        # A level equal to one already shown (marginal = uniform for most digits) adds nothing.
        if value > 0 and not any(abs(math.log(value / v)) < 0.03 for v in shown.values()):
            shown[name] = value
    return " · ".join(f"{name} {value:.3g}" for name, value in shown.items())


def plan_sections(target: Target) -> list[Section]:
    """The workspace's sections and panels, in reading order; keys no job logged are left out."""
    spec = target.spec
    n = spec.n_digits
    atlas = place_atlas(spec)
    places = list(range(spec.n_places - 1, -1, -1))  # carry-out first, as the answer is read

    def have(keys: list[str]) -> list[str]:
        return [k for k in keys if target.logged is None or k in target.logged]

    loss = [
        Panel(
            title=f"loss, {place_label(j, spec)} — atlas: {atlas_note(atlas[j])}",
            y=have([f"train/loss/place_{j}", f"val/loss/place_{j}"]),
            y_label="loss (nats)",
            log_y=True,
        )
        for j in places
    ]
    table = format_atlas_table(shelf_atlas(n, spec.base, spec.order, spec.task))
    heading = f"Shelf atlas (nats), {n}-digit base {spec.base} ({spec.order}, {spec.task})"
    loss.append(
        Panel(title="shelf atlas", markdown=f"**{heading}**: the loss of every knowledge level.\n\n```\n{table}\n```")
    )
    accuracy = [
        Panel(
            title=f"accuracy, {place_label(j, spec)}",
            y=have([f"train/acc/place_{j}", f"val/acc/place_{j}"]),
            y_label="accuracy",
            y_range=(0.0, 1.0),
        )
        for j in places
    ]
    offsets = sorted({0, 1, min(2, spec.base - 1), spec.base - 1})
    naive = []
    for j in places:
        if j == n:
            keys, what = ["val/carry_out/p0", "val/carry_out/p1"], "P(0), P(1)"
        else:
            keys = [f"val/naive/place_{j}/plus_{k}" for k in offsets]
            keys += [f"val/depth_sum/place_{j}/depth_{d}" for d in range(1, j)]
            what = "P(naive sum + k), P(depth-d sum)" if j > 1 else "P(naive sum + k)"
        naive.append(
            Panel(title=f"{what}, {place_label(j, spec)}", y=have(keys), y_label="probability", y_range=(0.0, 1.0))
        )
    carry = []
    for j in places[:-1]:  # the units digit has no carry in
        carry.append(
            Panel(
                title=f"loss by carry in, {place_label(j, spec)}",
                y=have([f"carry/place_{j}/cin_{c}/loss" for c in (0, 1)]),
                y_label="loss (nats)",
                log_y=True,
            )
        )
        carry.append(
            Panel(
                title=f"loss by carry-chain length, {place_label(j, spec)}",
                y=have([f"chain/place_{j}/len_{length}/loss" for length in range(n)]),
                y_label="loss (nats)",
                log_y=True,
            )
        )
    if spec.task == "add":
        classes = range(n + 1)
        carry.append(
            Panel(
                title="whole-answer accuracy by carry-complexity class (S_k: longest carry cascade k places)",
                y=have([f"class/S{k}/acc" for k in classes]),
                y_label="exact match",
                y_range=(0.0, 1.0),
            )
        )
        carry.append(
            Panel(
                title="loss by carry-complexity class",
                y=have([f"class/S{k}/loss" for k in classes]),
                y_label="loss (nats)",
                log_y=True,
            )
        )
    logged = sorted(target.logged or set())
    mechanism = []
    for j in places:
        for kind, operands in (("own", f"a{j}, b{j}"), ("lower", f"a{j - 1}, b{j - 1}")):
            keys = [k for k in logged if k.startswith("mech/attn/") and k.endswith(f"/place_{j}/{kind}")]
            title = f"attention on {operands} from where {place_label(j, spec)} is predicted, per head"
            mechanism.append(Panel(title=title, y=keys, y_label="attention mass", y_range=(0.0, 1.0)))
    probes = [k for k in logged if k.startswith("mech/probe/carry_in/")]
    probes.sort(key=lambda k: -int(k.split("/")[3].split("_")[1]))  # carry-out first
    mechanism.append(
        Panel(title="carry-in probe accuracy, per place", y=probes, y_label="accuracy", y_range=(0.4, 1.0))
    )
    layers = sorted(k for k in (target.logged or set()) if k.startswith("train/grad_norm/layer_"))
    grads = [
        Panel(title="gradient norm, all parameters", y=have(["train/grad_norm/global"]), y_label="L2 norm", log_y=True),
        Panel(
            title="gradient norm by parameter group",
            y=have([f"train/grad_norm/{g}" for g in GRAD_GROUPS]),
            y_label="L2 norm",
            log_y=True,
        ),
        Panel(title="gradient norm by layer", y=layers or ["train/grad_norm/layer_0"], y_label="L2 norm", log_y=True),
    ]
    shelves = [Panel(title="detected shelves (per run, from its per-place train loss)", table="shelves")]
    found = [loss, accuracy, naive, carry, mechanism, grads, shelves]
    sections = [
        Section(name, [p for p in panels if p.y or p.markdown or p.table])
        for name, panels in zip(SECTIONS, found, strict=True)
    ]
    return [s for s in sections if s.panels]


def workspace_name(target: Target) -> str:
    if target.run_id:
        return f"addrepro {target.group} run {target.run_id}"
    by = f" by {', '.join(target.swept)}" if target.swept else ""
    return f"addrepro {target.group}{by}"


# -- wandb-workspaces ---------------------------------------------------------------------------
def to_workspace(target: Target, sections: list[Section], entity: str | None = None):  # noqa: ANN201 - a Workspace
    """The ``wandb_workspaces`` workspace of ``sections``: runs of the target's group, grouped by its
    swept keys, x axis the training step. Needs ``pip install "addrepro[dashboard]"``."""
    import wandb_workspaces.reports.v2 as wr  # noqa: PLC0415 - optional extra
    import wandb_workspaces.workspaces as ws  # noqa: PLC0415 - optional extra

    def panel(p: Panel):  # noqa: ANN202
        if p.markdown is not None:
            return wr.MarkdownPanel(markdown=p.markdown)
        if p.table is not None:
            return wr.WeavePanelSummaryTable(table_name=p.table)
        return wr.LinePlot(
            title=p.title,
            x=STEP,
            y=p.y,
            log_y=p.log_y or None,
            range_y=p.y_range,
            title_x="step",
            title_y=p.y_label,
        )

    filters = [ws.Metric("Group") == target.group]
    if target.run_id:
        filters.append(ws.Metric("ID") == target.run_id)
    return ws.Workspace(
        entity=entity or target.entity or "",
        project=target.project,
        name=workspace_name(target),
        sections=[
            ws.Section(
                name=s.name,
                panels=[panel(p) for p in s.panels],
                is_open=True,
                panel_settings=ws.SectionPanelSettings(x_axis=STEP),
            )
            for s in sections
        ],
        settings=ws.WorkspaceSettings(x_axis=STEP, max_runs=100),
        runset_settings=ws.RunsetSettings(
            filters=ws.And(*filters),
            groupby=[ws.Config(k) for k in target.swept],
        ),
    )


def workspace_json(workspace) -> dict:  # noqa: ANN001 - a Workspace
    """The workspace as W&B stores it (its view spec), ready for ``json.dumps``."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def workspace_from_json(spec: dict, entity: str | None = None):  # noqa: ANN201 - a Workspace
    """The workspace saved by ``write_workspace``, to publish (with ``entity`` when it was saved without)."""
    import wandb_workspaces.workspaces as ws  # noqa: PLC0415 - optional extra
    from wandb_workspaces.workspaces import internal  # noqa: PLC0415 - optional extra

    view = internal.View.model_validate(spec)
    if entity:
        view.entity = entity
    return ws.Workspace._from_model(view)


def write_workspace(folder: Path, workspace) -> Path:  # noqa: ANN001 - a Workspace
    path = Path(folder) / WORKSPACE_JSON
    path.write_text(json.dumps(workspace_json(workspace), indent=1))
    return path
