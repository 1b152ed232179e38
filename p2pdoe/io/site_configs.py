"""Write one edge configuration per community (`p2pdoe site-config`)."""

from __future__ import annotations

from pathlib import Path

from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import coordinator_config, site_config


def write_site_configs(s: Scenario, out: Path) -> list[Path]:
    """`out/sites/<id>.json` for every community and `out/coordinator.json`; returns the paths."""
    folder = out / "sites"
    folder.mkdir(parents=True, exist_ok=True)
    coordinator = out / "coordinator.json"
    coordinator.write_text(coordinator_config(s).model_dump_json(indent=1), encoding="utf-8")
    paths = [coordinator]
    for c in range(len(s.communities)):
        config = site_config(s, c)
        path = folder / f"{config.community.id}.json"
        path.write_text(config.model_dump_json(indent=1), encoding="utf-8")
        paths.append(path)
    return paths


def read_site_config(path: Path) -> SiteConfig:
    return SiteConfig.model_validate_json(path.read_bytes())
