"""Flower's server strategies by name (``--strategy``), with the hyperparameters a RunConfig
gives them, and Flower's differential-privacy wrappers around them (``--dp``).

Whatever is built here aggregates; ``MergeNetFusion`` wraps it and fuses on its output, so
fusion runs on the privatised aggregate (post-processing keeps the DP guarantee).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from ..config import STRATEGIES, RunConfig
from .strategy import innermost

STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "bulyan": Bulyan,
}
assert tuple(STRATEGY_CLASSES) == STRATEGIES  # config.py names them for validation without importing flwr

# The attributes Flower's strategies keep their hyperparameters in, for the summary.
HYPERPARAMETERS = ("server_learning_rate", "server_momentum", "eta", "eta_l", "beta_1", "beta_2", "tau",
                   "proximal_mu", "beta", "num_malicious_nodes")


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of ``cfg.strategy``'s constructor that ``cfg`` sets; the rest
    keep Flower's defaults (``server_lr`` and ``tau`` of 0 mean exactly that)."""
    name, kwargs = cfg.strategy, {}
    if name == "fedavgm":
        kwargs["server_momentum"] = cfg.server_momentum
        if cfg.server_lr:
            kwargs["server_learning_rate"] = cfg.server_lr
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs["eta_l"] = cfg.lr  # FedOpt only logs the clients' learning rate: make it the true one
        if cfg.server_lr:
            kwargs["eta"] = cfg.server_lr
        if cfg.tau:
            kwargs["tau"] = cfg.tau
    if name in ("fedadam", "fedyogi"):
        kwargs.update(beta_1=cfg.beta1, beta_2=cfg.beta2)
    if name == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    if name == "fedtrimmedavg":
        kwargs["beta"] = cfg.trim_beta
    if name in ("krum", "bulyan"):
        kwargs["num_malicious_nodes"] = cfg.byzantine
    return kwargs


def build_strategy(cfg: RunConfig, sampling: dict[str, float | int]) -> Strategy:
    """``cfg.strategy`` with FedAvg's sampling arguments, wrapped for DP when ``cfg.dp`` asks."""
    strategy: Strategy = STRATEGY_CLASSES[cfg.strategy](**sampling, **hyperparameters(cfg))
    if cfg.dp == "server-fixed":
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.sample_size)
    elif cfg.dp == "client-fixed":  # the ClientApp clips with Flower's fixedclipping_mod
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.sample_size)
    return strategy


def describe(cfg: RunConfig, strategy: Strategy) -> dict[str, Any]:
    """What aggregated a run, for its summary: the strategy, its effective hyperparameters
    (Flower's defaults included) and the DP settings."""
    base = innermost(strategy)
    dp = {"mode": cfg.dp}
    if cfg.dp != "none":
        dp.update(noise_multiplier=cfg.dp_noise_multiplier, clipping_norm=cfg.dp_clipping_norm,
                  sampled_clients=cfg.sample_size)
    return {
        "name": cfg.strategy,
        "class": type(base).__name__,
        "hyperparameters": {key: getattr(base, key) for key in HYPERPARAMETERS if hasattr(base, key)},
        "dp": dp,
    }
