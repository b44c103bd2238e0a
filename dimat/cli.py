"""Command line: ``dimat simulate [hydra overrides] [--resume] [-m]`` and ``dimat peer ...``.

Configs are composed from the repository's ``configs/`` folder (found next to the package in an
editable install, or named by ``$DIMAT_CONFIG_DIR``) by :mod:`dimat.entry`, which also owns the
one-line errors: a bad configuration ends with one ``dimat: error: ...`` line on stderr and exit
code 2, never a traceback. A single run composes its config once; ``-m`` sweeps go through Hydra's
launcher, which composes each job.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dimat.entry import ConfigError, compose, config_dir, fail, one_line, user_errors

__all__ = ["main", "config_dir", "simulate_main", "peer_main"]


def _latest_run(root: Path = Path("outputs")) -> Path | None:
    runs = [p.parent.parent for p in root.glob("*/checkpoints/progress.json")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _prepare_resume(args: list[str]) -> tuple[list[str], bool]:
    """``--resume`` → ``resume=true``, and pick the newest run under outputs/ when no run_dir is given."""
    if "--resume" in args:
        args = [a for a in args if a != "--resume"] + ["resume=true"]
    resuming = any(a.lower() in ("resume=true", "resume=1", "resume=yes") for a in args)
    if resuming and not any(a.startswith("run_dir=") for a in args):
        latest = _latest_run()
        if latest is None:
            fail("--resume: no run with checkpoints under outputs/; pass run_dir=<folder>")
        args.append(f"run_dir={latest}")
    return args, resuming


def _resumed_config(run_dir: Path, overrides: Sequence[str], cfg: Any) -> Any:
    """The run folder's saved config is authoritative; only ``rounds`` may be raised to extend a run."""
    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found; is {run_dir} a dimat run folder?")
    try:
        old = OmegaConf.load(saved)
    except Exception as exc:  # a damaged file the user did not write by hand
        raise ConfigError(f"--resume: {saved} is not a readable config ({one_line(exc)})") from None
    if any(o.startswith("rounds=") for o in overrides):
        old.rounds = cfg.rounds
    old.resume = True
    return old


def run_simulation(cfg: Any, run_dir: Path, overrides: Sequence[str]) -> None:
    """One job of ``dimat simulate``: :func:`dimat.federation.simulate`, with one-line errors.

    With ``baseline=centralized`` the same budget then trains one model on the union of the peers'
    data (in ``<run_dir>/centralized``), and the closing line compares the two.
    """
    from omegaconf import OmegaConf

    from dimat.config import RunConfig
    from dimat.federation import simulate
    from dimat.methods import method_class

    with user_errors():
        if bool(cfg.get("resume", False)):
            cfg = _resumed_config(run_dir, overrides, cfg)
        summary = simulate(cfg, run_dir, resume=bool(cfg.resume), echo=lambda s: print(s, flush=True))
        reference = None
        baseline = cfg.get("baseline")
        if baseline and cfg.merge.method != baseline:
            ref_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            # the baseline method with the shared merge options only (the run's method's own keys are not its)
            own = {"class", *method_class(RunConfig.from_config(cfg).merge).options}
            ref_cfg.merge = {k: v for k, v in ref_cfg.merge.items() if k not in own}
            ref_cfg.merge.method, ref_cfg.resume, ref_cfg.attack.malicious = baseline, False, []
            print(f"dimat: baseline: {baseline} on the same budget", flush=True)
            reference = simulate(ref_cfg, run_dir / str(baseline), progress=False)
    acc = summary["final_mean_acc"]
    if acc is None:
        print(f"dimat: no round was run; outputs in {run_dir}", flush=True)
        return
    line = (f"dimat: final test accuracy mean {acc:.4f} (min {summary['final_min_acc']:.4f}, "
            f"max {summary['final_max_acc']:.4f})")
    ratio = summary.get("bytes_vs_one_merge")
    line += f"; sent {summary['total_bytes_sent'] / 1e6:,.1f} MB" + (f" ({ratio:.2g}x one merge per round)" if ratio else "")
    if reference is not None and reference["final_mean_acc"]:
        ref = reference["final_mean_acc"]
        line += (f"; {cfg.baseline} on the same budget {ref:.4f} "
                 f"(the federation reaches {acc / ref:.0%} of it)")
    shared = (summary.get("data") or {}).get("shared_data")
    if shared:
        line += f"; SHARED DATA: {shared}"
    print(f"{line}; outputs in {run_dir}", flush=True)


def simulate_main(args: Sequence[str]) -> int:
    """``dimat simulate``: one run from ``args`` (Hydra overrides), or a ``-m`` sweep through Hydra."""
    args, _ = _prepare_resume(list(args))
    sweep = any(a in ("-m", "--multirun") for a in args)
    if not sweep:
        with user_errors():
            if any(a.startswith("-") for a in args):
                raise ConfigError(f"unknown option(s) {' '.join(a for a in args if a.startswith('-'))} "
                                  "(overrides are key=value; -m sweeps, --resume continues)")
            cfg = compose(args)
            run_dir = Path(str(cfg.run_dir))
        run_simulation(cfg, run_dir, args)
        return 0
    return _sweep([a for a in args if a not in ("-m", "--multirun")])


def _sweep(overrides: list[str]) -> int:
    """Hydra's multirun launcher over ``overrides``; each job runs :func:`run_simulation`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from dimat.entry import check_group_choices

    with user_errors():
        check_group_choices(overrides)
        cdir = config_dir()

    def task(cfg: Any) -> None:
        hc = HydraConfig.get()
        run_simulation(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))

    saved = list(sys.argv)
    sys.argv = ["dimat-simulate", "-m", *overrides]
    try:
        hydra.main(version_base=None, config_path=str(cdir), config_name="config")(task)()
    finally:
        sys.argv = saved
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
