"""Command lines of the top-level scripts: parse, call the package, map errors to exit codes.

Every run option is a RunConfig field, so the same flags work on the runner and the server.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .config import DEFAULT_PRESET, RunConfig, add_run_options, apply_preset, config_from_args, preset_names
from .errors import EXIT_USAGE, ConfigError, UserError


def entry_point(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    def wrapped(argv: Sequence[str] | None = None) -> int:
        # SIGTERM unwinds like Ctrl-C, so every child process is stopped on the way out.
        signal.signal(signal.SIGTERM, _terminate)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = lambda msg, cat, *_: f"warning: {msg}\n"
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted: child processes stopped; partial results are kept", file=sys.stderr)
            return 130

    return wrapped


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _tls_options(parser: argparse.ArgumentParser, server: bool) -> None:
    group = parser.add_argument_group("transport security")
    group.add_argument("--insecure", action="store_true", help="plaintext, for a trusted network or loopback only")
    group.add_argument("--root-certificates", "--ssl-ca-certfile", dest="ca_cert", help="CA certificate (PEM)")
    if server:
        group.add_argument("--ssl-certfile", help="SuperLink certificate (PEM)")
        group.add_argument("--ssl-keyfile", help="SuperLink private key (PEM)")
        group.add_argument("--auth-supernode-keys", nargs="+", metavar="PATH", default=[],
                           help="only clients holding these keys may join: public key files (.pub) or folders "
                                "of them (scripts/make_node_keys.sh); needs TLS")
    else:
        group.add_argument("--auth-supernode-private-key", metavar="PATH",
                           help="this client's private key, when the server authenticates clients")


def _tls(args: argparse.Namespace, server: bool):
    from .launcher.flwr_cli import Tls

    if args.insecure:
        print("warning: --insecure: traffic between SuperLink and SuperNodes is not encrypted", file=sys.stderr)
        return None
    needed = [args.ca_cert] + ([args.ssl_certfile, args.ssl_keyfile] if server else [])
    if not all(needed):
        flags = "--ssl-ca-certfile, --ssl-certfile and --ssl-keyfile" if server else "--root-certificates"
        raise ConfigError(f"pass {flags} for TLS, or --insecure for plaintext on a trusted network")
    for path in needed:
        if not Path(path).is_file():
            raise ConfigError(f"certificate file {path} not found")
    if server:
        return Tls(Path(args.ca_cert), Path(args.ssl_certfile), Path(args.ssl_keyfile))
    return Tls(Path(args.ca_cert))


def _node_public_keys(paths: Sequence[str]) -> list[Path]:
    """Key files named directly, or every ``*.pub`` in a named folder; each must be an EC key."""
    keys: list[Path] = []
    for name in paths:
        path = Path(name)
        found = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not found:
            raise ConfigError(f"no *.pub node keys in {path}")
        keys += found
    for key in keys:
        _check_node_key(key, private=False)
    return keys


def _check_node_key(path: Path, private: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
        key = load_ssh_private_key(data, None) if private else load_ssh_public_key(data)
    except OSError as exc:
        raise ConfigError(f"node {kind} key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"node {kind} key {path} is not an OpenSSH key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise ConfigError(f"node {kind} key {path} must be ECDSA (ssh-keygen -t ecdsa), as Flower requires")


def _config(args: argparse.Namespace) -> RunConfig:
    """Preset (or, when resuming, the run's own saved config), then explicit flags on top."""
    if getattr(args, "resume_dir", None):
        base = saved_config(Path(args.resume_dir))
    else:
        base = apply_preset(args.preset) if getattr(args, "preset", None) else RunConfig()
    return config_from_args(args, base)


def saved_config(run_dir: Path) -> RunConfig:
    from .results import SUMMARY_FILE, ResultsError, read_summary

    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume {run_dir}: no such folder")
    if not (run_dir / SUMMARY_FILE).exists():  # first written with round 0's evaluation
        raise ConfigError(f"cannot resume {run_dir}: {run_dir / SUMMARY_FILE} is missing; a run stopped before it "
                          f"recorded round 0 has nothing to resume, so start it anew")
    try:
        saved = read_summary(run_dir)["config"]
    except ResultsError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    return RunConfig.from_run_config(saved).replace(output_dir=str(run_dir), resume=True)


def _preset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME|FILE.toml",
                        help=f"run options from config/NAME.toml ({', '.join(preset_names())}; default "
                             f"{DEFAULT_PRESET}: an offline Fashion-MNIST subset on CPU; paper: CIFAR-100 as in the "
                             f"write-up) or from any run-config file, the files `flwr run . --run-config` reads; "
                             f"flags override them")


# --- run_federated_mergenet.py ---------------------------------------------------------
def runner_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_federated_mergenet.py",
        description="Federated MergeNet in one command: FedAvg (or another Flower strategy, --strategy) over "
                    "MobileNetV2 clients with MergeNet fusion from a frozen ResNet50, in Flower's simulation engine "
                    "(default) or deployment runtime.",
    )
    _preset_option(parser)
    parser.add_argument("--mode", choices=("simulation", "deployment"), default="simulation")
    parser.add_argument("--suite", action="store_true",
                        help="run central, central+MergeNet, central+placebo, FedAvg, FedAvg+MergeNet, FedAvg+placebo "
                             "for every seed, then the report")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds for --suite (default: --seed and the next one, the fewest that give a spread "
                             "over seeds; the report pairs arms by seed)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="--suite: arms run side by side, each its own process (default 1: one at a time); "
                             "on a GPU this overlaps start-ups and evaluation, not training, which one arm's "
                             "recorded step already keeps the card busy with")
    parser.add_argument("--mps", action="store_true",
                        help="on a GPU: run every process of this run (the suite's arms, Ray's client actors) under "
                             "a CUDA MPS daemon of its own, started and stopped with the run, so that their kernels "
                             "share the card at once instead of taking turns (BENCHMARKS.md 4e; needs NVIDIA's "
                             "nvidia-cuda-mps-control)")
    parser.add_argument("--central", action="store_true", help="run the single-machine baseline instead")
    parser.add_argument("--cotrain-teacher", action="store_true", help="central MergeNet: train the teacher alongside, as the original")
    parser.add_argument("--pretrain-teacher", action="store_true", help="only pretrain the teacher checkpoint")
    parser.add_argument("--compare", action="store_true", help="write the comparison report of results/ afterwards")
    parser.add_argument("--server_address", "--server-address", default="127.0.0.1:9092",
                        help="deployment mode: where the SuperLink listens (HOST:PORT)")
    parser.add_argument("--results-root", default="results/suite", help="where --suite writes its runs")
    add_run_options(parser)
    return parser


@entry_point
def runner_main(argv: Sequence[str] | None = None) -> int:
    args = runner_parser().parse_args(argv)
    cfg = _config(args)
    with _mps(args.mps):
        return _run(args, cfg)


@contextlib.contextmanager
def _mps(wanted: bool) -> Iterator[None]:
    """With ``wanted``, this process and every process it starts (they inherit its environment)
    run under a CUDA MPS daemon of the run's own."""
    if not wanted:
        yield
        return
    from .launcher.processes import environment_with, private_mps

    with private_mps() as env:
        if env is None:
            raise ConfigError("--mps needs NVIDIA's nvidia-cuda-mps-control on the PATH, and a daemon it starts; "
                              "there is none here")
        with environment_with(env):
            yield


def _run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from .checks import check_run
    from .experiments.pretrain import ensure_teacher, pretrain_teacher

    if args.pretrain_teacher:
        pretrain_teacher(cfg)
        return 0
    if args.suite:
        from .launcher.suite import run_suite

        seeds = args.seeds or [cfg.seed, cfg.seed + 1]
        run_suite(cfg, seeds, Path(args.results_root), cotrain_teacher=args.cotrain_teacher, jobs=args.jobs)
        return 0
    if args.central and cfg.fusion_arms:
        raise ConfigError("--fusion-arms runs federated arms in one Flower run; the central arms run one at a time")
    # Checked before a missing teacher is pretrained; each arm checks again as it starts.
    check_run(cfg, Path(cfg.output_dir or f"results/{cfg.central_arm}") if args.central else cfg.output_path(),
              teacher=False)
    if cfg.fuses:
        ensure_teacher(cfg)
    if args.central:
        from .experiments.baseline import run_central

        out = run_central(cfg, mergenet=cfg.fusion, cotrain_teacher=args.cotrain_teacher)
    elif args.mode == "deployment":
        from .launcher.deployment import run_deployment

        out = run_deployment(cfg, args.server_address)
    else:
        from .launcher.federated import run_simulation

        out = run_simulation(cfg)
    print(f"results: {out}")
    if args.compare:
        from .report import write_report

        report = write_report([Path("results")], Path("results/comparison"))
        print(f"report: {report.path}\n{report.conclusion}")
    return 0


# --- federated_mergenet_server.py ------------------------------------------------------
@entry_point
def server_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="federated_mergenet_server.py",
        description="Start a Flower SuperLink, wait for the clients, run federated MergeNet, stream its log.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, default=9092, help="the SuperLink's one port")
    _preset_option(parser)
    _tls_options(parser, server=True)
    add_run_options(parser)
    args = parser.parse_args(argv)
    cfg = _config(args)
    tls = _tls(args, server=True)
    node_keys = _node_public_keys(args.auth_supernode_keys)  # serve() refuses them without TLS
    from .launcher.federated import serve

    out = serve(cfg, host=args.host, port=args.port, tls=tls, node_keys=node_keys)
    print(f"results: {out}")
    return 0


# --- federated_mergenet_client.py ------------------------------------------------------
@entry_point
def client_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="federated_mergenet_client.py",
        description="Start one federated MergeNet client (a Flower SuperNode) serving one data partition.",
    )
    parser.add_argument("--client_id", "--client-id", type=int, required=True, help="this client's partition, 0..N-1")
    parser.add_argument("--num_clients", "--num-clients", type=int, default=3, help="number of partitions N")
    parser.add_argument("--server_address", "--server-address", default="127.0.0.1:9092", help="the SuperLink (HOST:PORT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (falls back to cpu without a GPU) or auto")
    parser.add_argument("--port", type=int, default=0, help="this SuperNode's local port (default: a free one)")
    parser.add_argument("--max-wait-time", type=float, default=60.0,
                        help="seconds to keep reconnecting once the server is gone")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for training (default 0: all cores; set it when clients share a machine)")
    _tls_options(parser, server=False)
    args = parser.parse_args(argv)
    tls = _tls(args, server=False)
    auth_key = args.auth_supernode_private_key
    if auth_key is not None:
        _check_node_key(Path(auth_key), private=True)
    from .launcher.federated import join

    return join(args.client_id, args.num_clients, args.server_address, args.device, args.port, tls, args.max_wait_time,
                Path(auth_key) if auth_key else None, args.threads)
