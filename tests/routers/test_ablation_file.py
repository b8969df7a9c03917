"""experiments/router_ablation.yaml: every member resolves to a valid experiment and router, and
every registered router is in it.

Run: pytest tests/routers/test_ablation_file.py
"""

from pathlib import Path

import yaml

from moe_lab import config as C
from moe_lab.routers import registered_names, resolve_router

ABLATION = Path(__file__).resolve().parents[2] / "experiments" / "router_ablation.yaml"


def test_every_member_is_a_valid_experiment_and_every_router_is_covered():
    sweep = yaml.safe_load(ABLATION.read_text())["sweep"]
    base = ABLATION.parent / sweep["base"]
    shared = [f"{k}={v}" for k, v in sweep["overrides"].items()]
    names, routers = set(), set()
    for member in sweep["members"]:
        member = dict(member)
        names.add(member.pop("name"))
        overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                     for k, v in member.items()]
        cfg = C.load(base, [*shared, *overrides])
        resolve_router(cfg.moe.router, cfg)  # raises ConfigError on a bad member
        routers.add(cfg.moe.router["name"])
    assert len(names) == len(sweep["members"])  # member names are unique
    assert routers == set(registered_names())
