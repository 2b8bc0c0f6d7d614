"""``python -m addrepro.wandb_sweep <sweep.yaml> [--run N]``: the commands a W&B agent would launch.

A W&B grid sweep (``sweeps/wandb/*.yaml``) is run by ``wandb sweep <file>`` + ``wandb agent <id>``: the
server walks the grid and the agent starts one process per grid point, building its command line from
the sweep's ``command`` list. This module reproduces that expansion offline, so a sweep file can be
checked (and a few of its jobs run) without the W&B server.

The semantics follow the W&B agent (``wandb/wandb_agent.py`` and ``wandb/sdk/launch/sweeps/utils.py``
of wandb 0.2x-0.3x) and the sweep controller's grid search (``wandb/sweeps``, ``grid_search.py``):

* the grid: parameters sorted by name (nested ``parameters:`` blocks flattened, then re-nested into a
  dict value); ``values`` lists (and ``int_uniform`` / ``q_uniform`` ranges) form an
  ``itertools.product`` in that order, the last parameter varying fastest; ``value`` constants go
  into every run;
* ``command`` (default ``${env} ${interpreter} ${program} ${args}``): first every ``${envvar:NAME}``
  inside an item is replaced by the environment variable (by ``NAME`` itself when unset); then an
  item that is exactly a macro is replaced by its list of words, other items are kept verbatim:

  ======================== =================================================================
  ``${env}``               ``/usr/bin/env`` (nothing on Windows)
  ``${interpreter}``       ``python``
  ``${program}``           the sweep's ``program``
  ``${args}``              ``--key=value`` per parameter
  ``${args_no_hyphens}``   ``key=value`` per parameter (Hydra overrides)
  ``${args_no_boolean_flags}`` ``--key=value``, booleans as ``--key`` when true and left out when false
  ``${args_no_equals}``    ``--key value``
  ``${args_append_hydra}`` ``+key=value``; ``${args_override_hydra}``: ``++key=value``
  ``${args_json}``         one word, the JSON object ``{"key": value, ...}``
  ``${args_json_file}``    the path of a file holding that JSON (``wandb/sweep-<id>/config-<run>.json``)
  ======================== =================================================================

  An unknown ``${...}`` item expands to nothing. Values are formatted with Python's ``str`` (so
  ``True``, ``0.1``, ``[1, 2]``), exactly as the agent does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")
NEST = ".wbnest."  # internal separator for nested parameters (W&B uses an equally unlikely string)
MAX_RUNS = 100_000  # a grid this size is a typo (e.g. a float range with a tiny q), not a sweep


def load_sweep(path: str | Path) -> dict:
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the read
        raise ValueError(f"{path}: not a regular file")
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (a W&B sweep file is YAML)") from None
    if len(text) > 1_000_000:
        raise ValueError(f"{path}: over 1 MB: not a sweep file")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a W&B sweep file (expected a mapping)")
    if _size(config) > MAX_NODES:  # YAML aliases can make a small file expand enormously
        raise ValueError(f"{path}: expands to over {MAX_NODES} values (YAML aliases?): not a sweep file")
    return config


MAX_NODES = 100_000


def _size(node: Any, budget: list[int] | None = None) -> int:
    """Values in ``node`` with aliases expanded, counting stops once past ``MAX_NODES``."""
    budget = [0] if budget is None else budget
    budget[0] += 1
    if budget[0] <= MAX_NODES and isinstance(node, dict):
        for key, value in node.items():
            _size(key, budget)
            _size(value, budget)
    elif budget[0] <= MAX_NODES and isinstance(node, list):
        for value in node:
            _size(value, budget)
    return budget[0]


def _flatten(params: dict, prefix: str = "") -> list[tuple[str, dict]]:
    if not isinstance(params, dict):
        where = f"parameter {prefix[: -len(NEST)]}: parameters" if prefix else "parameters"
        raise ValueError(f"{where}: expected a mapping of names to specs, got {params!r}")
    out = []
    for key, spec in sorted(params.items()):
        if not isinstance(key, str) or not key or any(c.isspace() or c == "=" for c in key):
            raise ValueError(f"parameter {prefix}{key!r}: a name without spaces or '=' expected")
        if not isinstance(spec, dict):
            raise ValueError(f"parameter {prefix}{key}: expected a mapping, got {spec!r}")
        if "parameters" in spec and "value" not in spec and "values" not in spec:
            out += _flatten(spec["parameters"], f"{prefix}{key}{NEST}")
        else:
            out.append((f"{prefix}{key}", spec))
    return out


def _choices(name: str, spec: dict) -> list[Any] | None:
    """The grid values of one parameter; ``None`` for a constant."""
    dist = spec.get("distribution")
    if dist is None and isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        dist = "int_uniform"  # W&B infers it from integer bounds
    if "value" in spec and "values" not in spec:
        return None
    if "values" in spec and dist in (None, "categorical") and "probabilities" not in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ValueError(f"parameter {name}: values must be a non-empty list, got {spec['values']!r}")
        return list(spec["values"])
    if dist in ("int_uniform", "q_uniform"):
        bounds = [spec.get("min"), spec.get("max"), spec.get("q", 1)]
        if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds) or bounds[2] <= 0:
            raise ValueError(f"parameter {name}: {dist} needs numbers min, max (and q > 0), got {spec}")
    if dist in ("int_uniform", "q_uniform") and spec["min"] > spec["max"]:
        raise ValueError(f"parameter {name}: {dist} needs min <= max, got min {spec['min']} and max {spec['max']}")
    if dist in ("int_uniform", "q_uniform"):
        size = (spec["max"] - spec["min"]) / (1 if dist == "int_uniform" else spec.get("q", 1))
        if not size < MAX_RUNS:  # also NaN/inf bounds
            raise ValueError(
                f"parameter {name}: {dist} from {spec['min']} to {spec['max']} has more than {MAX_RUNS} values"
            )
    if dist == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    if dist == "q_uniform":
        return np.arange(spec["min"], spec["max"], spec.get("q", 1.0)).tolist()
    raise ValueError(f"parameter {name}: grid search needs `values`, `value`, int_uniform or q_uniform, got {spec}")


def _renest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(NEST)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def grid_runs(sweep: dict) -> list[dict[str, Any]]:
    """The parameter values of every run of a grid sweep, in the order the W&B controller issues them."""
    if sweep.get("method") != "grid":
        raise ValueError(f"only grid sweeps can be expanded ahead of time (method is {sweep.get('method')!r})")
    params = _flatten(sweep.get("parameters") or {})
    if not params:
        raise ValueError("the sweep has no parameters")
    constants = {name: spec["value"] for name, spec in params if _choices(name, spec) is None}
    swept = [(name, _choices(name, spec)) for name, spec in params if _choices(name, spec) is not None]
    size = 1
    for _, values in swept:
        size *= len(values)
    if size > MAX_RUNS:
        raise ValueError(f"the grid has {size} runs (at most {MAX_RUNS}): {' x '.join(str(len(v)) for _, v in swept)}")
    runs = []
    for combo in itertools.product(*(values for _, values in swept)):
        values = {**constants, **dict(zip((n for n, _ in swept), combo, strict=True))}
        runs.append(_renest({name: values[name] for name, _ in params}))
    return runs


def command_args(args: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one run's parameter values."""
    flags, no_hyphens, no_booleans, no_equals, append, override = [], [], [], [], [], []
    for key, value in args.items():
        flag = f"{key}={value}"
        flags.append(f"--{flag}")
        no_hyphens.append(flag)
        no_equals += [f"--{key}", str(value)]
        append.append(f"+{flag}")
        override.append(f"++{flag}")
        if isinstance(value, bool):
            if value:
                no_booleans.append(f"--{key}")
        else:
            no_booleans.append(f"--{flag}")
    return {
        "args": flags,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_no_equals": no_equals,
        "args_append_hydra": append,
        "args_override_hydra": override,
        "args_json": [json.dumps(args)],
    }


def check_command(command: Any) -> list:
    """The sweep's ``command``: a list of words (strings or numbers), as the agent reads it."""
    if not isinstance(command, list) or not all(
        isinstance(c, str | int | float) and not isinstance(c, bool) for c in command
    ):
        raise ValueError(f"command: expected a list of words like {DEFAULT_COMMAND}, got {command!r}")
    return command


def expand_command(sweep: dict, args: dict[str, Any], json_file: str = "", env: dict | None = None) -> list[str]:
    """One run's command line, as ``wandb agent`` builds it."""
    env = os.environ if env is None else env
    command = [str(c) for c in check_command(sweep.get("command") or DEFAULT_COMMAND)]
    command = [ENVVAR.sub(lambda m: env.get(m.group(1), m.group(1)), c) for c in command]
    macros = command_args(args)
    macros["interpreter"] = ["python"]
    if "program" in sweep and not isinstance(sweep["program"], str):
        raise ValueError(f"program: expected a file or module name, got {sweep['program']!r}")
    if "program" in sweep:
        macros["program"] = [str(sweep["program"])]
    elif "${program}" in command:
        raise ValueError("the command uses ${program} but the sweep has no `program`")
    macros["args_json_file"] = [json_file]
    if platform.system() != "Windows":
        macros["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for item in command:
        if item.startswith("${") and item.endswith("}"):
            out += macros.get(item[2:-1]) or []
        else:
            out.append(item)
    return out


def _json_file(sweep_id: str, run_id: str) -> str:
    return os.path.join(os.environ.get("WANDB_DIR", ""), "wandb", f"sweep-{sweep_id}", f"config-{run_id}.json")


def expand_commands(sweep_yaml_path: str | Path) -> list[list[str]]:
    """Every command line a ``wandb agent`` would launch for a grid sweep file, in grid order.

    ``${args_json_file}`` expands to ``wandb/sweep-local/config-run<i>.json`` (the agent uses the sweep
    and run ids); :func:`run_commands` writes those files before running a command that needs one.
    """
    sweep = load_sweep(sweep_yaml_path)
    return [expand_command(sweep, args, _json_file("local", f"run{i}")) for i, args in enumerate(grid_runs(sweep))]


def run_commands(
    sweep_yaml_path: str | Path,
    n: int,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    extra: list[str] | None = None,
) -> list[int]:
    """Run the first ``n`` commands one after another, as an agent would; returns their exit codes.

    Like the agent, every job gets a fresh ``WANDB_RUN_ID`` (and no sweep id: without the W&B server the
    runs are plain runs, offline if ``WANDB_MODE=offline``). ``python`` resolves to this interpreter
    (its folder goes first on ``PATH``). ``extra`` words are appended to every command (e.g. short
    test settings as Hydra overrides).
    """
    sweep = load_sweep(sweep_yaml_path)
    cwd = Path(cwd or ".")
    codes = []
    for i, args in enumerate(grid_runs(sweep)[:n]):
        run_id = secrets.token_hex(4)
        json_file = _json_file("local", run_id)
        command = expand_command(sweep, args, json_file) + list(extra or [])
        if json_file in command:
            path = cwd / json_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(args))
        env = {**os.environ, "WANDB_RUN_ID": run_id}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        print(f"[{i}] {shlex.join(command)}", flush=True)
        codes.append(subprocess.run(command, cwd=cwd, env=env, timeout=timeout).returncode)
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m addrepro.wandb_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="a W&B grid sweep file, e.g. sweeps/wandb/width.yaml")
    parser.add_argument("--run", type=int, default=0, metavar="N", help="also run the first N commands here")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser.epilog = "Words after `--` are appended to every command that --run runs (e.g. trainer.max_steps=100)."
    ns = parser.parse_args(argv)
    if ns.run < 0:
        parser.error(f"--run: expected a number of commands >= 0, got {ns.run}")
    try:
        commands = expand_commands(ns.sweep)
    except (OSError, ValueError, KeyError, yaml.YAMLError) as e:
        print(f"addrepro.wandb_sweep: {e}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command))
    if ns.run:
        codes = run_commands(ns.sweep, ns.run, extra=extra)
        failed = [i for i, c in enumerate(codes) if c != 0]
        print(f"addrepro.wandb_sweep: {len(codes) - len(failed)}/{len(codes)} runs ok", file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
