"""Command line: ``dimat simulate [hydra overrides] [--resume] [-m]``.

Configs are composed by Hydra from the repository's ``configs/`` folder (found next to the package
in an editable install, or named by ``$DIMAT_CONFIG_DIR``). A bad configuration ends with one
``dimat: error: ...`` line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

GROUPS = ("model", "data", "partition", "topology", "merge", "transport", "attack", "experiment")
EXIT_CONFIG = 2


def config_dir() -> Path:
    """The Hydra config folder: ``$DIMAT_CONFIG_DIR``, else ``configs/`` beside the package."""
    env = os.environ.get("DIMAT_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "configs", here / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(
        "dimat configs not found (looked in " + ", ".join(map(str, candidates)) +
        "); install with `pip install -e .` from the repository or set DIMAT_CONFIG_DIR"
    )


def fail(message: str) -> None:
    """Print one error line and exit with the configuration-error status."""
    print(f"dimat: error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _check_group_choices(overrides: Sequence[str], cdir: Path) -> None:
    """Reject ``group=unknown`` before Hydra does (Hydra's message is long and exits 1)."""
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra.", "+", "~")):
            continue
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):
            choice = choice.strip()
            if not (cdir / key / f"{choice}.yaml").is_file():
                available = sorted(p.stem for p in (cdir / key).glob("*.yaml"))
                noun = "data set" if key == "data" else key
                fail(f"unknown {noun} {choice!r} (available: {', '.join(available)})")


def _check_composes(overrides: Sequence[str], cdir: Path) -> None:
    """Compose once up front so a bad key or value is one error line (Hydra's own is several)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            compose("config", overrides=list(overrides))
    except Exception as exc:  # any composition failure is a configuration error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = exc.__cause__
        detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        fail(f"{first.rstrip('.')}: {detail}" if detail else first)
    finally:
        GlobalHydra.instance().clear()


def _latest_run(root: Path = Path("outputs")) -> Path | None:
    runs = [p.parent.parent for p in root.glob("*/checkpoints/progress.json")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _prepare_resume(args: list[str]) -> list[str]:
    """``--resume`` → ``resume=true``, and pick the newest run under outputs/ when no run_dir is given."""
    if "--resume" in args:
        args = [a for a in args if a != "--resume"] + ["resume=true"]
    resuming = any(a.lower() in ("resume=true", "resume=1", "resume=yes") for a in args)
    if resuming and not any(a.startswith("run_dir=") for a in args):
        latest = _latest_run()
        if latest is None:
            fail("--resume: no run with checkpoints under outputs/; pass run_dir=<folder>")
        args.append(f"run_dir={latest}")
    return args


def _simulate_task(cfg: Any) -> None:
    """The Hydra task: compose → validate → build peers → run rounds → write outputs."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dimat.federation import ConfigError, build_federation, run_rounds
    from dimat.transport.inproc import InProcTransport

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    resume = bool(cfg.get("resume", False))
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            fail(f"--resume: {saved} not found; is {run_dir} a dimat run folder?")
        # The saved config is authoritative; only `rounds` may be raised to extend a run.
        old = OmegaConf.load(saved)
        if any(o.startswith("rounds=") for o in hc.overrides.task):
            old.rounds = cfg.rounds
        old.resume = True
        cfg = old
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors are configuration errors
        fail(f"config: {exc}".splitlines()[0])
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    transport_name = str(cfg.transport.get("name", "inproc"))
    if transport_name != "inproc":
        fail(f"`dimat simulate` runs every peer in one process; transport={transport_name} has its own launcher")
    try:
        fed = build_federation(cfg)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    run_dir.mkdir(parents=True, exist_ok=True)
    from dimat.federation import atomic_write_text

    atomic_write_text(saved, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    print(f"dimat: {fed.method} · {cfg.model.name} · {cfg.data.name} · {fed.num_peers} peer(s) · "
          f"{cfg.topology.name} · {cfg.rounds} rounds x {cfg.local_epochs} epochs → {run_dir}", flush=True)
    transport = InProcTransport()
    try:
        summary = run_rounds(fed, transport, run_dir, resume=resume, progress=bool(cfg.get("progress", True)),
                             echo=lambda s: print(s, flush=True))
    except FileNotFoundError as exc:  # e.g. resume with missing checkpoints
        fail(str(exc))
    finally:
        transport.close()
    print(f"dimat: final test accuracy mean {summary['final_mean_acc']:.4f} "
          f"(min {summary['final_min_acc']:.4f}, max {summary['final_max_acc']:.4f}); outputs in {run_dir}",
          flush=True)


def simulate_main(args: Sequence[str]) -> int:
    """``dimat simulate``: run Hydra with our config folder on ``args``."""
    import hydra

    args = list(args)
    try:
        cdir = config_dir()
    except FileNotFoundError as exc:
        fail(str(exc))
    _check_group_choices([a for a in args if not a.startswith("-")], cdir)
    args = _prepare_resume(args)
    if not any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
        _check_composes(args, cdir)
    argv0 = sys.argv[0]
    sys.argv = ["dimat-simulate", *args]
    try:
        hydra.main(version_base=None, config_path=str(cdir), config_name="config")(_simulate_task)()
    finally:
        sys.argv[0] = argv0
    return 0


def peer_main(args: Sequence[str]) -> int:
    """``dimat peer --id K --peers peers.yaml [overrides]``: one peer over gRPC (see dimat.grpc_peer)."""
    from dimat.grpc_peer import peer_main as _peer_main

    return _peer_main(args)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "simulate": (simulate_main, "run a whole federation in this process (Hydra overrides follow)"),
    "peer": (peer_main, "run one peer over gRPC: --id K --peers peers.yaml run_dir=DIR [overrides]"),
}


def _usage() -> str:
    lines = ["usage: dimat <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "e.g. dimat simulate merge=average topology=fully_connected rounds=5",
              "     dimat simulate -m merge=dimat,average", "     dimat simulate --resume run_dir=outputs/<run>"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dimat`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(_usage(), file=sys.stderr)
        fail(f"unknown command {cmd!r}")
    return COMMANDS[cmd][0](rest) or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
