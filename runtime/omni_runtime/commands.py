"""The commands of ``omni-runtime`` other than ``serve``, and the discovery they share with it.

``models`` lists what the packages register, ``new`` starts a package from the template,
``simulate`` replays a trace through the scheduler, ``doctor`` describes the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from omni_runtime.config import ConfigError, OmniFile, repository_server
from omni_runtime.discovery import Discovery, config_files, discover_all, find_packages
from omni_runtime.doctor import doctor_report
from omni_runtime.isolation import Isolation
from omni_runtime.isolation.environments import EnvironmentBuilder
from omni_runtime.progress import StatusLine, TerminalProgress

__all__ = [
    "discover",
    "discoverer",
    "doctor",
    "isolation_for",
    "models",
    "new",
    "simulate",
    "template_dir",
]


def discover(
    args: argparse.Namespace, isolation: Isolation | None = None
) -> tuple[Discovery, dict[Path, OmniFile]]:
    packages = find_packages(args.paths)
    files = config_files(args.paths, getattr(args, "config", None))
    # Importing a package runs its code: discovery runs in the same sandbox as a worker (and
    # in a cgroup of its own where the runtime has cgroups).
    sandbox = isolation if isolation is not None and isolation.namespaces else None
    # On a terminal a display that updates in place; in a pipe or a log, a line per step.
    with TerminalProgress() if sys.stderr.isatty() else contextlib.nullcontext() as progress:
        builder = None
        if not args.shared_env:
            builder = EnvironmentBuilder(
                args.state_dir / "envs",
                progress=progress,
                source_builds=repository_server(files, packages).source_builds,
                sandbox=sandbox,
            )
        discovery = asyncio.run(discover_all(packages, files, builder, sandbox, progress=progress))
    return discovery, files


def discoverer(
    args: argparse.Namespace, isolation: Isolation, files: dict[Path, OmniFile]
) -> Callable[[list[Path]], Awaitable[Discovery]]:
    """Discovery of packages that come later (the fleet's catalog), as ``discover`` does it:
    each in its own environment unless ``--shared-env``, in the workers' sandbox."""
    sandbox = isolation if isolation.namespaces else None
    builder = None
    if not args.shared_env:
        builder = EnvironmentBuilder(
            args.state_dir / "envs",
            source_builds=repository_server(files, []).source_builds,
            sandbox=sandbox,
        )

    async def discover_packages(packages: list[Path]) -> Discovery:
        return await discover_all(packages, files, builder, sandbox)

    return discover_packages


def isolation_for(args: argparse.Namespace) -> Isolation:
    packages = find_packages(args.paths)
    files = config_files(args.paths, getattr(args, "config", None))
    return Isolation.detect(
        packages,
        state_dir=args.state_dir,
        masked=_secret_files(files),
        cache_quota=repository_server(files, packages).cache_quota,
    )


def _secret_files(files: dict[Path, OmniFile]) -> tuple[Path, ...]:
    """Files no model may read: every omni.toml (other models' env) and the token files."""
    token_files = [os.environ.get(f"{n}_FILE") for n in ("OMNI_API_TOKEN", "OMNI_ADMIN_TOKEN")]
    paths = [*files, *(Path(p) for p in token_files if p)]
    return tuple(dict.fromkeys(p.resolve() for p in paths))


def models(args: argparse.Namespace) -> int:
    isolation = isolation_for(args)
    try:
        discovery, _ = discover(args, isolation)
    finally:
        isolation.close()
    if args.json:
        print(
            json.dumps(
                {
                    "models": [spec.summary() for spec in discovery.models],
                    "failures": [
                        {"package": str(f.package_dir), "error": f.error}
                        for f in discovery.failures
                    ],
                },
                indent=2,
            )
        )
    else:
        rows = [("MODEL", "TASK", "INPUTS", "OUTPUTS")]
        for spec in discovery.models:
            rows.append(
                (
                    spec.name,
                    spec.task or "-",
                    ", ".join(f"{t['name']}:{t['datatype']}{t['shape']}" for t in spec.inputs),
                    ", ".join(f"{t['name']}:{t['datatype']}{t['shape']}" for t in spec.outputs),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print(
                "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
            )
        for failure in discovery.failures:
            print(f"failed: {failure.error}", file=sys.stderr)
    return 1 if discovery.failures and not discovery.models else 0


def template_dir() -> Path:
    """The model template: packaged with the runtime, or in the source tree beside it."""
    for candidate in (
        Path(__file__).resolve().parent / "templates" / "model",
        Path(__file__).resolve().parents[2] / "templates" / "model",
    ):
        if (candidate / "cookiecutter.json").is_file():
            return candidate
    raise ConfigError("the model template is missing from this installation of omni-runtime")


def new(args: argparse.Namespace) -> int:
    from cookiecutter.exceptions import CookiecutterException, FailedHookException
    from cookiecutter.main import cookiecutter

    logging.getLogger("cookiecutter").setLevel(logging.CRITICAL)  # its errors come as ours
    context = {"engine": args.engine, "model_name": args.name, "task": args.task}
    extra = {k: v for k, v in context.items() if v is not None}
    try:
        package = Path(
            cookiecutter(
                str(template_dir()),
                no_input=args.no_input or not sys.stdin.isatty(),
                output_dir=str(args.output_dir),
                extra_context=extra,
            )
        )
    except FailedHookException:
        return 2  # the template's check said what was wrong, on stderr
    except (CookiecutterException, OSError) as exc:
        print(f"omni-runtime new: {exc}", file=sys.stderr)
        return 2
    print(f"created {package}")
    print(f"next: omni-runtime serve {package}")
    if (package / "tests").is_dir():
        print(f"its tests: cd {package} && pip install -e '.[test]' && pytest")
    return 0


def simulate(args: argparse.Namespace) -> int:
    from omni_runtime.scheduler.simulator import parse_options, plan, read_trace

    options = parse_options(
        gpu_memory=args.gpu_memory,
        max_batch=args.max_batch,
        pcie_gbps=args.pcie_gbps,
        disk_gbps=args.disk_gbps,
        slo=args.slo,
        target=args.target,
        gpus=args.gpus,
        policy=args.policy,
        host_memory=args.host_memory,
        start_seconds=args.start_seconds,
        concurrency=args.concurrency,
        config=args.config,
    )
    trace = read_trace(args.trace)
    print(
        f"omni-runtime simulate: {len(trace)} requests; each run replays them through the "
        "scheduler on a virtual clock",
        file=sys.stderr,
        flush=True,
    )
    # A line per replay: rewritten in place on a terminal, one after another in a pipe.
    status = StatusLine(sys.stderr)
    try:
        result = plan(trace, options, status.update)
    finally:
        status.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    p99 = result["p99_wait_seconds"]
    cpu = result["gpus"] == 0
    gpus = "none: a CPU node" if cpu else str(result["gpus"])
    if result["searched"]:
        gpus += " (fewest meeting the target)"
    rows = [
        ("requests", f"{result['requests']}"),
        ("models", f"{result['models']}"),
        (f"GPUs ({result['policy']})", gpus),
        ("SLO attainment", f"{result['slo_attainment']:.2%} (target {result['target']:.0%})"),
        (
            "one replica per model" if cpu else "one model per GPU",
            "always running" if cpu else f"{result['baseline_gpus']} GPUs",
        ),
        ("  its SLO attainment", f"{result['baseline_slo_attainment']:.2%}"),
        ("GPUs saved", "-" if cpu else f"{result['gpu_saving']:.1%}"),
        (
            "cold starts",
            f"{result['cold_starts']} ({result['cold_starts_per_1000']:g} per 1,000 requests)",
        ),
        ("evictions", f"{result['evictions']}"),
        ("wakes", f"{result['wakes']}"),
        ("refused (429/503)", f"{result['refused']}"),
        ("p99 wait", "never started" if p99 is None else f"{p99:.3f}s"),
    ]
    for label, value in rows:
        print(f"{label:<22} {value}")
    if not result["meets_target"]:
        where = "a CPU node" if cpu else f"{result['gpus']} GPUs"
        print(
            f"omni-runtime: {where} do not meet the target of {result['target']:.0%} "
            "within the SLO",
            file=sys.stderr,
        )
    return 0


def doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key:<22} {value}")
    return 0
