"""One typed configuration for every entry point.

`RunConfig` is the single definition of a run option: the command-line flags, the Flower
run-config keys (``[tool.flwr.app.config]``, kebab-case) and the presets are derived from
its fields. Its defaults are the original write-up's setting (CIFAR-100, 50 rounds of 5
local epochs, SGD lr 0.1). A preset is a Flower run-config file, ``config/<name>.toml``,
read by ``flwr run . --run-config`` and by the scripts alike; ``quick`` (an offline
Fashion-MNIST subset for 2 CPU cores) is the default of both, and the app's
``[tool.flwr.app.config]`` is RunConfig's defaults with it on top (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = PROJECT_ROOT / "config"
DEFAULT_PRESET = "quick"

DATASETS = ("cifar100", "fashion-mnist")
DEVICES = ("cpu", "cuda", "auto")
FUSION_MODES = ("gated", "replace")
# Flower's Message-API strategies the server can aggregate with; MergeNet fusion wraps any of them.
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
              "krum", "bulyan")
DP_MODES = ("none", "server-fixed", "client-fixed")
# The comparison's arms by their fusion setting: the placebo fuses the teacher's shuffled fc.weight.
FUSION_ARMS = {"plain": {"fusion": False, "placebo_teacher": False},
               "mergenet": {"fusion": True, "placebo_teacher": False},
               "placebo": {"fusion": True, "placebo_teacher": True}}


@dataclass
class AdapterConfig:
    """ParamAttention and its optimiser, as a fusion unit needs them; a run builds it from its
    ``adapter_*`` and ``fusion_mode`` options (RunConfig.adapter). The per-path attention width
    follows the original code, max((da + db) // 2, 128) // h, so it is not an option."""

    h: int = 8
    num_layers: int = 2
    lr: float = 0.001
    weight_decay: float = 0.0005
    clip_norm: float = 50.0
    warmup_updates: int = 4
    mode: str = "gated"


def opt(default: Any, help: str) -> Any:
    """A RunConfig option: its default and its help text, in one place."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Every option of a run. Field ``foo_bar`` is flag ``--foo-bar`` and run-config key ``foo-bar``."""

    # Data
    dataset: str = opt("cifar100", "dataset: fashion-mnist (offline here) or cifar100")
    data_dir: str = opt("data", "where datasets are read from / downloaded to")
    train_limit: int = opt(0, "use this many training images (0 = all), chosen by seed")
    test_limit: int = opt(0, "use this many test images (0 = all), chosen by seed")
    val_fraction: float = opt(0.1, "each client's local validation split")
    # Federation
    rounds: int = opt(50, "federated rounds")
    local_epochs: int = opt(5, "local epochs per round")
    batch_size: int = opt(128, "mini-batch size of local (and central) training")
    num_clients: int = opt(3, "number of clients (data partitions)")
    clients_per_round: int = opt(0, "clients sampled per round (0 = all)")
    min_clients: int = opt(0, "minimum connected clients before a round starts (0 = clients per round)")
    alpha: float = opt(0.0, "Dirichlet label-skew concentration (> 0); leave unset for IID")
    # Server strategy. 0 for server_lr / tau means the chosen strategy's own Flower default.
    strategy: str = opt("fedavg", f"server aggregation: {', '.join(STRATEGIES)} (Flower's strategies; fusion "
                                  "runs on their aggregate)")
    server_lr: float = opt(0.0, "server learning rate: FedAvgM's server_learning_rate, FedAdam/FedYogi/FedAdagrad's "
                                "eta (0 = Flower's default: 1.0 / 0.1 / 0.01 / 0.1)")
    server_momentum: float = opt(0.0, "FedAvgM's server momentum (Flower's default 0.0)")
    beta1: float = opt(0.9, "FedAdam/FedYogi first-moment decay (Flower's default 0.9)")
    beta2: float = opt(0.99, "FedAdam/FedYogi second-moment decay (Flower's default 0.99)")
    tau: float = opt(0.0, "FedAdam/FedYogi/FedAdagrad adaptivity (0 = Flower's default 1e-3)")
    proximal_mu: float = opt(
        0.0, "FedProx's proximal weight mu; the clients add mu/2 * ||w - w_global||^2 (Flower's default 0.0)")
    trim_beta: float = opt(0.2, "FedTrimmedAvg's fraction trimmed from each end (Flower's default 0.2)")
    byzantine: int = opt(0, "Krum/Bulyan: malicious clients to tolerate (Flower's default 0)")
    # Differential privacy with Flower's wrappers (server-fixed) or wrapper + fixedclipping_mod (client-fixed)
    dp: str = opt("none", "differential privacy: none, server-fixed (server clips each update and adds noise) or "
                          "client-fixed (clients clip, server adds noise); fusion runs on the privatised aggregate")
    dp_noise_multiplier: float = opt(
        1.0, "DP: Gaussian noise std as a multiple of the clipping norm, over the sampled clients")
    dp_clipping_norm: float = opt(10.0, "DP: L2 norm every client update is clipped to")
    # Local optimiser, as the single-machine MergeNet baseline
    lr: float = opt(0.1, "SGD learning rate before the milestones")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay")
    lr_milestones: str = opt("0.3,0.6,0.8", "epochs where the lr drops: fractions of the run's epochs, or whole "
                                            "epochs (60,120,160)")
    lr_gamma: float = opt(0.2, "factor the learning rate is multiplied by at each milestone")
    # MergeNet fusion
    fusion: bool = opt(True, "disable MergeNet fusion (plain FedAvg)")
    # Clients recompute the averaged model's BatchNorm statistics on their data in the evaluate
    # phase (SWA's update_bn): averaged statistics do not describe averaged weights, and without
    # this the quick preset's FedAvg stayed at chance. Off: --no-recalibrate-bn (plain FedAvg).
    recalibrate_bn: bool = opt(True, "keep the averaged BatchNorm statistics (plain FedAvg) instead of having the "
                                     "clients recompute them for the averaged model")
    # Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021) estimates the
    # statistics from a fixed number of batches; the whole split is a forward pass over as many
    # images as the client trains on, every round (README, "BatchNorm recalibration on fewer batches").
    recalibrate_batches: int = opt(0, "BatchNorm recalibration: the first this many batches of each client's "
                                      "training split (0: all of them)")
    fusion_start_round: int = opt(2, "first round whose average is fused")
    fusion_frequency: int = opt(1, "fuse every this many rounds")
    fusion_mode: str = opt("gated", "gated (starts at identity) or replace (the original MergeNet)")
    fusion_batches: int = opt(1, "central baseline: fuse every this many batches (MergeNet's f)")
    adapter_lr: float = opt(
        0.001, "ParamAttention adapter's learning rate (AdamW; constant for --adapter-warmup updates, then cosine)")
    adapter_heads: int = opt(8, "attention heads of the adapter")
    adapter_layers: int = opt(2, "ParamAttention layers in the adapter")
    adapter_warmup: int = opt(4, "adapter updates at constant learning rate before its cosine decay")
    adapter_clip: float = opt(50.0, "gradient-norm clip of the adapter's updates")
    adapter_weight_decay: float = opt(0.0005, "adapter weight decay (not on biases, norms or the gate)")
    # Teacher
    teacher_checkpoint: str = opt(
        "", "teacher ResNet50 checkpoint (default checkpoints/teacher_resnet50_<dataset>.pt)")
    random_teacher: bool = opt(False, "smoke tests only: use an untrained teacher (recorded in the results)")
    placebo_teacher: bool = opt(False, "control arm: fuse from the teacher's fc.weight with its entries shuffled "
                                       "(same shape and values, no knowledge)")
    teacher_epochs: int = opt(200, "epochs of teacher pretraining when its checkpoint is missing")
    teacher_lr: float = opt(0.1, "teacher pretraining: peak of its warm-up + cosine learning rate")
    teacher_train_limit: int = opt(-1, "training images for the teacher: -1 = train_limit, 0 = the whole set")
    # The suite starts its arms beside the pretraining of their teacher: a Flower run spends its
    # first tens of seconds starting, and needs the teacher only from its first fusing arm on.
    await_teacher: bool = opt(False, "wait for a missing teacher checkpoint that another process is pretraining "
                                     "(the suite's arms, started beside it) instead of pretraining it or stopping")
    # Runtime
    output_dir: str = opt("", "where metrics.jsonl, summary.json and models go")
    seed: int = opt(
        0, "seed of the data subset, partitions, initial weights and data order (same seed = paired runs)")
    device: str = opt("auto", "client training device: cpu, cuda or auto")
    server_device: str = opt("auto", "device of the fusion and the server's evaluation: cpu, cuda or auto")
    client_threads: int = opt(
        0, "torch threads per client; 0 = torch's default (simulation sets its CPUs per client)")
    compile: bool = opt(False, "CUDA: torch.compile the student's training step (Inductor), replayed in the recorded "
                               "step; compiled once per process")
    round_timeout: float = opt(3600.0, "seconds a train/evaluate phase may take")
    node_wait_timeout: float = opt(300.0, "seconds to wait for the minimum of clients")
    eval_batch_size: int = opt(256, "batch size of evaluation")
    skip_federated_eval: bool = opt(False, "only the server's central evaluation (halves the messages per round)")
    resume: bool = opt(False, "continue the run in output_dir from its last completed round")
    fusion_arms: str = opt("", "several arms in one Flower run, one after another, each in output-dir/<arm>: any "
                               "of plain, mergenet, placebo (the suite's federated arms share one start-up); empty = "
                               "the one arm the other options describe")

    # --- derived values -------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        """The run's budget of passes over the data, the same for central and federated arms."""
        return self.rounds * self.local_epochs

    def milestones(self, total_epochs: int | None = None) -> list[int]:
        """The epochs at which the lr drops, for a run of ``total_epochs`` (default: this run's)."""
        return resolve_milestones(self.lr_milestones, self.total_epochs if total_epochs is None else total_epochs)

    @property
    def aggregation(self) -> str:
        """The server side of the arm's name: the strategy, and the DP mode when there is one."""
        return self.strategy if self.dp == "none" else f"{self.strategy}-dp-{self.dp}"

    @property
    def fusion_suffix(self) -> str:
        if not self.fusion:
            return ""
        return "_placebo" if self.placebo_teacher else "_mergenet"

    @property
    def arm(self) -> str:
        """``fedavg``, ``fedavg_mergenet``, ``fedadam-dp-server-fixed_placebo``, ..."""
        return self.aggregation + self.fusion_suffix

    @property
    def central_arm(self) -> str:
        """The single-machine arm with this run's fusion setting."""
        return "central" + self.fusion_suffix

    @property
    def sample_size(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def min_available(self) -> int:
        return self.min_clients or self.sample_size

    def teacher_path(self) -> Path:
        return Path(self.teacher_checkpoint or f"checkpoints/teacher_resnet50_{self.dataset}.pt")

    def output_path(self) -> Path:
        return Path(self.output_dir or ("results" if self.fusion_arms else f"results/{self.arm}"))

    def anchored(self, root: Path) -> RunConfig:
        """The same run with its data, teacher and output paths absolute, relative ones taken
        against ``root``: the ServerApp and ClientApps run in other processes and folders."""
        def anchor(path: Path) -> str:
            path = path.expanduser()
            return str(path if path.is_absolute() else (Path(root) / path).resolve())

        return self.replace(data_dir=anchor(Path(self.data_dir)), teacher_checkpoint=anchor(self.teacher_path()),
                            output_dir=anchor(self.output_path()))

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(
            h=self.adapter_heads,
            num_layers=self.adapter_layers,
            lr=self.adapter_lr,
            weight_decay=self.adapter_weight_decay,
            clip_norm=self.adapter_clip,
            warmup_updates=self.adapter_warmup,
            mode=self.fusion_mode,
        )

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def with_fusion_arm(self, name: str) -> RunConfig:
        """This run as arm ``name`` of the comparison: plain (no fusion), mergenet or placebo."""
        return self.replace(**FUSION_ARMS[name])

    def arm_runs(self) -> list[RunConfig]:
        """The runs this config stands for: itself, or each of its ``fusion_arms`` in output_dir/<arm>."""
        if not self.fusion_arms:
            return [self]
        runs = [self.replace(fusion_arms="").with_fusion_arm(name) for name in self.fusion_arms.split()]
        return [run.replace(output_dir=str(self.output_path() / run.arm)) for run in runs]

    @property
    def fuses(self) -> bool:
        """Whether this run, or one of its fusion arms, fuses: then it needs the teacher."""
        return any(run.fusion for run in self.arm_runs())

    @property
    def teacher_missing(self) -> bool:
        """Its teacher checkpoint is not there (yet): pretrained by the runner or the suite, or
        by another process that this run awaits (``teacher_pending``)."""
        return not self.random_teacher and not self.teacher_path().is_file()

    @property
    def teacher_pending(self) -> bool:
        """Its teacher checkpoint is still being pretrained elsewhere: each arm waits for it as it starts."""
        return self.await_teacher and self.fuses and self.teacher_missing

    # --- Flower run config -------------------------------------------------------------
    def to_run_config(self) -> dict[str, Any]:
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config`` (kebab-case keys, TOML scalars)."""
        return cls(**field_values(run_config))


def field_values(run_config: dict[str, Any]) -> dict[str, Any]:
    """RunConfig field values from the run-config keys present (kebab-case, TOML scalars)."""
    return {f.name: _coerce(f, run_config[key_of(f.name)]) for f in fields(RunConfig) if key_of(f.name) in run_config}


def resolve_milestones(spec: str, total_epochs: int) -> list[int]:
    """``"0.3,0.6,0.8"`` (fractions of the run, each in (0, 1)) or ``"60,120,160"`` (whole epochs).

    A fraction f becomes epoch ceil(f * total): 3 epochs give milestones 1, 2, 3, so even a
    short run spends its last epoch at the smallest rate, and 200 epochs give the write-up's
    60, 120, 160 exactly.
    """
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if all("." not in p for p in parts):
        values = [int(p) for p in parts]
        if any(v < 1 for v in values):
            raise ValueError("whole-epoch milestones must be at least 1")
        return values
    fractions = [float(p) for p in parts]
    if not all(0 < f < 1 for f in fractions):
        raise ValueError("fractional milestones must lie strictly between 0 and 1")
    # The tolerance keeps 0.3 * 200 = 60.000000000000004 at 60.
    return [max(1, math.ceil(f * total_epochs - 1e-9)) for f in fractions]


def key_of(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)


def validate(cfg: RunConfig) -> RunConfig:
    """Reject options out of range with one line a user can act on."""
    checks = [
        (cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}"),
        (cfg.device in DEVICES, f"unknown device {cfg.device!r}; choose one of {', '.join(DEVICES)}"),
        (cfg.server_device in DEVICES, f"unknown server device {cfg.server_device!r}; choose one of {', '.join(DEVICES)}"),
        (cfg.fusion_mode in FUSION_MODES, f"unknown fusion mode {cfg.fusion_mode!r}; choose one of {', '.join(FUSION_MODES)}"),
        (cfg.rounds >= 1, f"--rounds must be at least 1 (got {cfg.rounds})"),
        (cfg.local_epochs >= 1, f"--local-epochs must be at least 1 (got {cfg.local_epochs})"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})"),
        (cfg.num_clients >= 1, f"--num-clients must be at least 1 (got {cfg.num_clients})"),
        (cfg.alpha >= 0, f"--alpha must be > 0 (got {cfg.alpha})"),
        (0 <= cfg.clients_per_round <= cfg.num_clients,
         f"--clients-per-round ({cfg.clients_per_round}) cannot exceed --num-clients ({cfg.num_clients})"),
        (0 <= cfg.min_clients <= cfg.num_clients,
         f"--min-clients ({cfg.min_clients}) cannot exceed --num-clients ({cfg.num_clients})"),
        (cfg.fusion_start_round >= 1, f"--fusion-start-round must be at least 1 (got {cfg.fusion_start_round})"),
        (cfg.fusion_frequency >= 1, f"--fusion-frequency must be at least 1 (got {cfg.fusion_frequency})"),
        (cfg.recalibrate_batches >= 0, f"--recalibrate-batches must be >= 0 (got {cfg.recalibrate_batches})"),
        (cfg.fusion_batches >= 1, f"--fusion-batches must be at least 1 (got {cfg.fusion_batches})"),
        (cfg.train_limit >= 0 and cfg.test_limit >= 0, "--train-limit and --test-limit must be >= 0"),
        (cfg.teacher_train_limit >= -1, "--teacher-train-limit must be -1 (as --train-limit), 0 (all) or positive"),
        (cfg.teacher_epochs >= 1, f"--teacher-epochs must be at least 1 (got {cfg.teacher_epochs})"),
        (0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {cfg.val_fraction})"),
        (cfg.round_timeout > 0 and cfg.node_wait_timeout > 0, "timeouts must be positive"),
        (0 <= cfg.seed < 2**32, f"--seed must be in [0, 2**32) (got {cfg.seed})"),
        (cfg.eval_batch_size >= 1, f"--eval-batch-size must be at least 1 (got {cfg.eval_batch_size})"),
        (cfg.client_threads >= 0, f"--client-threads must be >= 0 (got {cfg.client_threads})"),
        (cfg.fusion or not cfg.placebo_teacher, "--placebo-teacher is a fusion arm: drop --no-fusion"),
        (set(cfg.fusion_arms.split()) <= set(FUSION_ARMS),
         f"--fusion-arms lists arms among {', '.join(FUSION_ARMS)} (got {cfg.fusion_arms!r})"),
        (not (cfg.fusion_arms and cfg.resume), "--resume continues one arm: drop --fusion-arms"),
    ] + optimiser_checks(cfg) + strategy_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        cfg.milestones()
    except ValueError as exc:
        raise ConfigError(f"--lr-milestones must be fractions of the run in (0, 1) like 0.3,0.6,0.8 or whole "
                          f"epochs like 60,120,160 (got {cfg.lr_milestones!r}: {exc})") from None
    return cfg


def optimiser_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """The local SGD, the teacher's and the adapter's settings; every float option finite (a NaN
    passes no comparison, but inf passes some and would train a run into NaN)."""
    infinite = [key_of(f.name) for f in fields(cfg) if isinstance(getattr(cfg, f.name), float)
                and not math.isfinite(getattr(cfg, f.name))]
    return [
        (not infinite, f"--{', --'.join(infinite)} must be a finite number"),
        (cfg.lr > 0, f"--lr must be positive (got {cfg.lr})"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1) (got {cfg.momentum})"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0 (got {cfg.weight_decay})"),
        (0 < cfg.lr_gamma <= 1, f"--lr-gamma must be in (0, 1] (got {cfg.lr_gamma})"),
        (cfg.teacher_lr > 0, f"--teacher-lr must be positive (got {cfg.teacher_lr})"),
        (cfg.adapter_lr > 0, f"--adapter-lr must be positive (got {cfg.adapter_lr})"),
        (cfg.adapter_weight_decay >= 0, f"--adapter-weight-decay must be >= 0 (got {cfg.adapter_weight_decay})"),
        (cfg.adapter_clip > 0, f"--adapter-clip must be positive (got {cfg.adapter_clip})"),
        (cfg.adapter_warmup >= 0, f"--adapter-warmup must be >= 0 (got {cfg.adapter_warmup})"),
        (cfg.adapter_layers >= 1, f"--adapter-layers must be at least 1 (got {cfg.adapter_layers})"),
        # Each attention path is at least 128 wide, split among the heads.
        (1 <= cfg.adapter_heads <= 128, f"--adapter-heads must be in [1, 128] (got {cfg.adapter_heads})"),
    ]


# Options that only one family of strategies reads, and the strategies that read them.
STRATEGY_OPTIONS = {
    "server_lr": ("fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "server_momentum": ("fedavgm",),
    "beta1": ("fedadam", "fedyogi"),
    "beta2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi", "fedadagrad"),
    "proximal_mu": ("fedprox",),
    "trim_beta": ("fedtrimmedavg",),
    "byzantine": ("krum", "bulyan"),
}


def strategy_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """The strategy, its hyperparameters and DP: ranges, and combinations that cannot work."""
    defaults = RunConfig()
    n, f = cfg.sample_size, cfg.byzantine
    checks = [
        (cfg.strategy in STRATEGIES, f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}"),
        (cfg.dp in DP_MODES, f"unknown --dp mode {cfg.dp!r}; choose one of {', '.join(DP_MODES)}"),
    ]
    # A hyperparameter of another strategy would be silently ignored: say so instead.
    checks += [(getattr(cfg, name) == getattr(defaults, name) or cfg.strategy in users,
                f"--{key_of(name)} is a setting of {', '.join(users)}, not of --strategy {cfg.strategy}")
               for name, users in STRATEGY_OPTIONS.items()]
    checks += [
        (cfg.server_lr >= 0 and cfg.tau >= 0, "--server-lr and --tau must be >= 0 (0 = the strategy's default)"),
        (0 <= cfg.server_momentum < 1, f"--server-momentum must be in [0, 1) (got {cfg.server_momentum})"),
        (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (cfg.proximal_mu >= 0, f"--proximal-mu must be >= 0 (got {cfg.proximal_mu})"),
        (0 <= cfg.trim_beta < 0.5, f"--trim-beta must be in [0, 0.5) (got {cfg.trim_beta})"),
        (f >= 0, f"--byzantine must be >= 0 (got {f})"),
        # Krum needs n > 2f + 2 replies to pick a point whose neighbours are honest; Bulyan n >= 4f + 3.
        (cfg.strategy != "krum" or n >= 2 * f + 3,
         f"krum with --byzantine {f} needs at least {2 * f + 3} clients per round (has {n})"),
        (cfg.strategy != "bulyan" or n >= 4 * f + 3,
         f"bulyan with --byzantine {f} needs at least {4 * f + 3} clients per round (has {n})"),
    ]
    if cfg.dp != "none":
        checks += [
            (cfg.dp_clipping_norm > 0, f"--dp-clipping-norm must be positive (got {cfg.dp_clipping_norm})"),
            (cfg.dp_noise_multiplier >= 0, f"--dp-noise-multiplier must be >= 0 (got {cfg.dp_noise_multiplier})"),
        ]
    return checks


# --- presets -------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def preset_path(preset: str) -> Path:
    """``config/<preset>.toml`` for a name, the file itself for a path ending in .toml."""
    return Path(preset) if preset.endswith(".toml") else PRESET_DIR / f"{preset}.toml"


def read_preset(preset: str) -> dict[str, Any]:
    """A preset's options as RunConfig field values; a preset is a Flower run-config file."""
    path = preset_path(preset)
    if not path.is_file():
        if not preset.endswith(".toml"):
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())} "
                              f"or pass a run-config .toml file")
        raise ConfigError(f"run-config file {path} not found")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable TOML file ({exc})") from None
    unknown = sorted(set(values) - {key_of(f.name) for f in fields(RunConfig)})
    if unknown:
        raise ConfigError(f"{path} sets unknown option(s) {', '.join(unknown)}; run options are the keys of "
                          f"[tool.flwr.app.config] in pyproject.toml")
    try:
        return field_values(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_preset(preset: str, base: RunConfig | None = None) -> RunConfig:
    return (base or RunConfig()).replace(**read_preset(preset))


# --- command line ----------------------------------------------------------------------
# Extra spellings users of the original scripts know.
FLAG_ALIASES = {"num_clients": ["--num_clients"]}
def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add one flag per RunConfig field; unset flags stay None so presets can fill them."""
    group = parser.add_argument_group("run options")
    for f in fields(RunConfig):
        flag = "--" + key_of(f.name)
        help_text = f.metadata["help"]
        if f.default is True:  # on by default: the flag turns it off
            group.add_argument("--no-" + key_of(f.name), dest=f.name, action="store_const", const=False, default=None,
                               help=help_text)
            continue
        if f.name == "resume":
            group.add_argument("--resume", dest="resume_dir", metavar="OUTPUT_DIR", default=None,
                               help="continue the run in OUTPUT_DIR from its last completed round")
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_text)
            continue
        names = [flag] + FLAG_ALIASES.get(f.name, [])
        group.add_argument(*names, dest=f.name, type={"int": int, "float": float}.get(kind, str), default=None,
                           help=help_text)


def to_flags(cfg: RunConfig) -> list[str]:
    """The command-line flags that reproduce ``cfg`` (for child processes)."""
    flags: list[str] = []
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.default is True:
            flags += [] if value else ["--no-" + key_of(f.name)]
        elif f.name == "resume":
            flags += ["--resume", cfg.output_dir] if value else []
        elif f.name == "alpha" and value == 0:
            continue  # IID: --alpha takes only values > 0
        elif isinstance(value, bool):
            flags += ["--" + key_of(f.name)] if value else []
        else:
            flags += ["--" + key_of(f.name), str(value)]
    return flags


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """Explicit flags override the base (a preset or the defaults)."""
    base = base or RunConfig()
    changes = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    if getattr(args, "resume_dir", None):
        changes.update(resume=True, output_dir=str(args.resume_dir))
    if "alpha" in changes and changes["alpha"] <= 0:
        raise ConfigError(f"--alpha must be > 0 (got {changes['alpha']}); leave it unset for IID partitions")
    return validate(base.replace(**changes))


__all__ = [
    "AdapterConfig", "RunConfig", "validate", "apply_preset", "read_preset", "preset_names", "add_run_options",
    "config_from_args", "key_of", "resolve_milestones", "DATASETS", "DEVICES", "FUSION_MODES", "STRATEGIES",
    "DP_MODES",
]
