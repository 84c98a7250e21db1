"""A ServerApp for the tests: one Flower run, several experiments one after another on the
same simulated nodes. Each is our real FederatedRun (strategy, fusion, results) with its own
output folder; sharing one run spares each experiment the simulation's start-up.

``matrix`` (a run-config key of this app only) lists them as ``strategy:fusion[:dp]``,
for example ``"fedavg:0 fedavg:1 krum:0 fedavg:1:client-fixed"``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmergenet.config import STRATEGY_OPTIONS, RunConfig
from fedmergenet.flower.server_app import FederatedRun
from fedmergenet.results import library_versions, write_summary

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    root = Path(cfg.output_dir)
    names = []
    for item in str(context.run_config["matrix"]).split():
        strategy, fusion, dp = (item.split(":") + ["none"])[:3]
        name = f"{strategy}-{'fusion' if fusion == '1' else 'plain'}" + ("" if dp == "none" else f"-{dp}")
        names.append(name)
        # Settings of other strategies go back to their defaults (validation refuses them).
        defaults = {option: getattr(RunConfig(), option) for option, users in STRATEGY_OPTIONS.items()
                    if strategy not in users}
        run_cfg = cfg.replace(strategy=strategy, fusion=fusion == "1", dp=dp, output_dir=str(root / name), **defaults)
        FederatedRun(run_cfg).run(grid)
    # The launcher reads the root summary to learn that the Flower run completed.
    write_summary(root, {"arm": cfg.arm, "status": "completed", "experiments": names, "best_top1": None,
                         "final_top1": None, "config": cfg.to_run_config(), "versions": library_versions()})
