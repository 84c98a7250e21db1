"""A ServerApp for the tests: one Flower run, several experiments one after another on the
same simulated nodes. Each is our real FederatedRun (strategy, fusion, results) with its own
output folder; sharing one run spares each experiment the simulation's start-up.

``experiments`` (a run-config key of this app only) is a JSON list; each item names its
output folder (``name``), the RunConfig options it changes, and optionally the ``fault`` the
test ClientApp acts out (faulty_client.py), for example
``[{"name": "krum-huge", "strategy": "krum", "byzantine": 1, "fusion": false, "fault": "huge"}]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmergenet.config import STRATEGY_OPTIONS, RunConfig
from fedmergenet.flower.server_app import FederatedRun
from fedmergenet.results import library_versions, write_summary

app = ServerApp()


class FaultGrid:
    """The run's Grid, naming the experiment's fault in every message it sends."""

    def __init__(self, grid: Grid, fault: str) -> None:
        self._grid, self._fault = grid, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            message.content["config"]["test-fault"] = self._fault
        return self._grid.push_messages(messages)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    root = Path(cfg.output_dir)
    names = []
    for experiment in json.loads(str(context.run_config["experiments"])):
        name, fault = experiment.pop("name"), experiment.pop("fault", "")
        names.append(name)
        strategy = experiment.get("strategy", cfg.strategy)
        # Settings of other strategies go back to their defaults (validation refuses them).
        defaults = {option: getattr(RunConfig(), option) for option, users in STRATEGY_OPTIONS.items()
                    if strategy not in users}
        run_cfg = cfg.replace(**defaults).replace(**experiment, output_dir=str(root / name))
        FederatedRun(run_cfg).run(FaultGrid(grid, fault))
    # The launcher reads the root summary to learn that the Flower run completed.
    write_summary(root, {"arm": cfg.arm, "status": "completed", "experiments": names, "best_top1": None,
                         "final_top1": None, "config": cfg.to_run_config(), "versions": library_versions()})
