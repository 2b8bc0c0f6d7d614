"""``python -m addrepro.theory data.n_digits=5 data.base=10``: print the shelf atlas, write ``shelves.json``.

The atlas lists, for every answer place, the Bayes-optimal loss of each knowledge level (see
``addrepro.shelves.atlas``); it uses the same ``data`` config group as training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from addrepro.shelves.atlas import format_atlas_table, shelf_atlas
from addrepro.training.config import ConfigError, DataConfig, check_fields, config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="theory")
def main(cfg: DictConfig) -> None:
    try:
        check_fields(DataConfig, cfg.data, "data")
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    d = cfg.data
    entries = shelf_atlas(d.n_digits, d.base, d.order, d.task, mc_samples=cfg.mc_samples, seed=cfg.mc_seed)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "shelves.json"
    path.write_text(json.dumps([e.as_dict() for e in entries], indent=1))
    print(f"shelf atlas (nats), {d.n_digits}-digit base {d.base}, order {d.order}, task {d.task}")
    print(format_atlas_table(entries))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
