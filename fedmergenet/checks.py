"""What every entry point checks before any work starts, in one place: option ranges
(config.validate), folders it will write, the data, and the teacher it will read. A bad
value is a UserError, which the entry points turn into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig, validate
from .errors import ConfigError


def writable_dir(path: Path, what: str = "output directory") -> None:
    """Create ``path`` if needed and prove a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not writable ({exc.strerror})") from None


def check_run(cfg: RunConfig, output: Path, teacher: bool) -> RunConfig:
    """The run's options, its output folder, its data and (``teacher``) its teacher checkpoint."""
    from .data.splits import train_set
    from .teacher import load_teacher

    cfg = validate(cfg)
    writable_dir(output)
    train = train_set(cfg)
    if cfg.num_clients > len(train):
        raise ConfigError(f"--num-clients {cfg.num_clients} exceeds the {len(train)} training images")
    if teacher and cfg.fuses and not cfg.random_teacher and not cfg.teacher_pending:
        load_teacher(cfg.teacher_path(), dataset=cfg.dataset, num_classes=train.num_classes)
    return cfg
