#!/usr/bin/env bash
# Launcher for federated MergeNet.
#
#   ./start_federated_experiment.sh                 menu (only when stdin is a terminal)
#   ./start_federated_experiment.sh quick [ARGS]    quick experiment (simulation)
#   ./start_federated_experiment.sh client 0 --device cuda
#
# The project's virtual environment is $FEDMERGENET_VENV (default: .venv next to this
# script); it is created on first use and reused afterwards. Nothing is ever installed
# into the system Python. Every Python command is exec'd, so Ctrl-C reaches Python
# directly and the launcher exits with Python's exit code.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SCRIPT_DIR"

VENV="${FEDMERGENET_VENV:-$SCRIPT_DIR/.venv}"
PY="$VENV/bin/python"
PROG="$(basename "$0")"

usage() {
    cat <<EOF
Usage: $PROG [SUBCOMMAND] [ARGS...]

Subcommands (extra ARGS are passed on to the Python entry point):
  quick [ARGS]        quick experiment: run_federated_mergenet.py --preset quick
  suite [ARGS]        the six arms (placebos included), two seeds, and the report: run_federated_mergenet.py --suite
  paper [ARGS]        paper preset: run_federated_mergenet.py --preset paper
  server [ARGS]       SuperLink + app in deployment mode: federated_mergenet_server.py
  client ID [ARGS]    one client (SuperNode) with numeric id ID: federated_mergenet_client.py
  compare [ARGS]      comparison report: compare_results.py [RESULT_DIR ...] [--out DIR]
  bench [ARGS]        benchmarks, writes BENCHMARKS.md: python -m benchmarks [--tiny]
  setup               create (or reuse) the virtual environment and exit; then
                      'source .venv/bin/activate && flwr run .' runs the quick experiment
  test [ARGS]         create (or reuse) the virtual environment and run the tests: all of them
                      (unit level in parallel, then the end-to-end runs), or pytest -q ARGS
  help, -h, --help    show this text

Without a subcommand an interactive menu is shown (stdin must be a terminal).

Environment:
  FEDMERGENET_VENV    virtual environment to use or create (default: $SCRIPT_DIR/.venv)

Examples:
  $PROG quick --seeds 0 1 2
  $PROG server --rounds 10 --min-clients 2 --insecure
  $PROG client 0 --device cuda --server_address 127.0.0.1:9092 --insecure
  $PROG compare results --out results/comparison
EOF
}

usage_error() {
    [ "$#" -gt 0 ] && echo "error: $*" >&2
    usage >&2
    exit 2
}

# The pinned requirements, installed by uv (the version Flower itself depends on) with pip's
# own settings, so it takes the same files from the same indexes, links and constraints as
# pip would, several times faster (torch alone unpacks to 5 GB); plain pip if uv cannot be had.
install_requirements() (
    local requirements="$SCRIPT_DIR/requirements_federated.txt"
    if ! "$VENV/bin/pip" install -q "uv>=0.13.5,<0.14.0"; then
        "$VENV/bin/pip" install -r "$requirements"
        return
    fi
    # `pip config list` prints environment settings (PIP_*) before files; the first one wins, as in pip.
    local line key value seen=" "
    while IFS= read -r line; do
        key="${line%%=*}" && key="${key##*.}" && value="${line#*=}" && value="${value#\'}" && value="${value%\'}"
        case "$seen" in *" $key "*) continue ;; esac
        seen+="$key "
        case "$key" in
            index-url) export UV_DEFAULT_INDEX="$value" ;;
            extra-index-url) export UV_INDEX="$value" ;;
            find-links) export UV_FIND_LINKS="$value" ;;
            constraint) export UV_CONSTRAINT="$value" ;;
            cert) export SSL_CERT_FILE="$value" ;;
        esac
    done < <("$VENV/bin/pip" config list 2>/dev/null)
    # pip weighs every index alike; uv's default would take a package only from the first
    # index that has it, whatever versions the others offer.
    export VIRTUAL_ENV="$VENV" UV_INDEX_STRATEGY=unsafe-best-match
    if ! "$VENV/bin/uv" pip install -r "$requirements"; then
        "$VENV/bin/pip" install -r "$requirements"  # compiles the bytecode itself
        return
    fi
    compile_bytecode
)

# Bytecode is compiled once, as pip does at install: with PYTHONDONTWRITEBYTECODE set, every
# process would compile torch's and Flower's sources again. Skipped: test suites and the
# subpackages no process of the project imports (Ray's libraries, networkx, parts of sympy),
# about 40 % of the files; anything skipped still imports, compiled in memory. A file that is
# not Python 3.11 (another version's syntax, a template) does not compile and is no failure.
SKIP_BYTECODE='/(tests?|SelfTest)/|/ray/(rllib|data|train|tune|llm|serve|air)/|/networkx/|/sympy/(physics|combinatorics|stats|codegen|vector|liealgebras)/|/fontTools/|/numpy/(distutils|f2py)/'
compile_bytecode() {
    "$VENV/bin/python" -m compileall -q -j 0 -x "$SKIP_BYTECODE" "$VENV/lib" >/dev/null 2>&1 || true
}

# Create the virtual environment if it is missing; reuse it otherwise. Then make plain
# `flwr run .` work in it: its activate script exports Flower's settings (a project-local
# FLWR_HOME, offline, no runtime installs) and .flwr/ gets a local simulation for the quick preset.
ensure_venv() {
    if [ ! -x "$PY" ]; then
        if ! command -v python3 >/dev/null 2>&1; then
            echo "error: python3 not found; it is needed to create $VENV" >&2
            exit 1
        fi
        echo "Creating virtual environment at $VENV ..." >&2
        python3 -m venv "$VENV"
        install_requirements
        "$VENV/bin/pip" install --no-build-isolation --no-deps -e "$SCRIPT_DIR"
    fi
    "$PY" -c 'import sys; from pathlib import Path; from fedmergenet.launcher.federated import configure_flwr_run
configure_flwr_run(Path(sys.argv[1]))' "$VENV"
}

prepare() {
    ensure_venv
    mkdir -p logs results checkpoints
}

# run SCRIPT [ARGS...]: replace this shell with the Python entry point.
run() {
    prepare
    exec "$PY" "$@"
}

check_client_id() {
    if [ -z "${1:-}" ]; then
        usage_error "client needs a numeric client id, e.g. '$PROG client 0'"
    fi
    case "$1" in
        *[!0-9]*) usage_error "client id must be a non-negative integer, got '$1'" ;;
    esac
}

menu() {
    cat <<EOF
==========================================
  Federated MergeNet
==========================================
  1) Full experiment (quick run, simulation)
  2) Server only
  3) One client
  4) Compare results
  5) Comparison suite (six arms, two seeds, report)
  0) Quit
EOF
    local choice client_id device
    read -r -p "Choice [0-5]: " choice || exit 0
    case "$choice" in
        1) run run_federated_mergenet.py --preset quick ;;
        2) run federated_mergenet_server.py --insecure ;;
        3)
            read -r -p "Client id (e.g. 0): " client_id || exit 0
            check_client_id "$client_id"
            read -r -p "Device [cpu/cuda] (default cpu): " device || exit 0
            device="${device:-cpu}"
            case "$device" in
                cpu | cuda) ;;
                *) usage_error "device must be cpu or cuda, got '$device'" ;;
            esac
            run federated_mergenet_client.py --client_id "$client_id" --device "$device" --insecure
            ;;
        4) run compare_results.py ;;
        5) run run_federated_mergenet.py --suite ;;
        0 | q | Q) exit 0 ;;
        *) usage_error "unknown choice '$choice'" ;;
    esac
}

if [ "$#" -eq 0 ]; then
    if [ -t 0 ]; then
        menu
        exit 0
    fi
    usage_error "no subcommand given (the menu needs a terminal on stdin)"
fi

cmd="$1"
shift
case "$cmd" in
    help | -h | --help)
        usage
        exit 0
        ;;
    setup)
        ensure_venv
        echo "Virtual environment ready: $VENV"
        exit 0
        ;;
    quick) run run_federated_mergenet.py --preset quick "$@" ;;
    suite) run run_federated_mergenet.py --suite "$@" ;;
    paper) run run_federated_mergenet.py --preset paper "$@" ;;
    server) run federated_mergenet_server.py "$@" ;;
    client)
        check_client_id "${1:-}"
        client_id="$1"
        shift
        run federated_mergenet_client.py --client_id "$client_id" "$@"
        ;;
    compare) run compare_results.py "$@" ;;
    bench)
        ensure_venv
        exec "$PY" -m benchmarks "$@"
        ;;
    test)
        ensure_venv
        if [ $# -eq 0 ]; then
            # Everything: the unit level on one worker per core, then the end-to-end runs one
            # after another (two Flower runtimes side by side thrash on 2 cores).
            "$PY" -m pytest -q -n auto -m "not slow" || exit $?
            exec "$PY" -m pytest -q -m slow
        fi
        exec "$PY" -m pytest -q "$@"
        ;;
    *) usage_error "unknown subcommand '$cmd'" ;;
esac
