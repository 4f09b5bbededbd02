"""The ``medvlsam2`` command line.

Sub-commands import what they need when they run, so ``--help``, ``plugins`` and ``list``
start without torch. User errors print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from medvlsam2 import __version__
from medvlsam2.core.errors import MedVLError, RunInterrupted, one_line

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
#: 128 + the signal number, as a shell reports a process stopped by that signal.
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def _cmd_plugins(args: argparse.Namespace) -> int:
    from medvlsam2.core.registry import get_host

    host = get_host()
    rows = [
        {"kind": s.kind, "name": s.name, "provider": s.provider, "version": s.version, "summary": s.summary}
        for s in host.all_specs()
    ]
    if args.json:
        print(json.dumps({"plugins": rows, "failed": [{"provider": d, "error": e} for d, e in host.failures]}, indent=2))
        return 0
    widths = {key: max([len(key)] + [len(str(r[key])) for r in rows]) for key in ("kind", "name", "provider", "version")}
    header = "  ".join(key.upper().ljust(widths[key]) for key in widths) + "  SUMMARY"
    print(header)
    for r in rows:
        print("  ".join(str(r[key]).ljust(widths[key]) for key in widths) + "  " + r["summary"])
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from medvlsam2.core.registry import get_host

    for name in get_host().names(args.kind, args.glob):
        print(name)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from medvlsam2.core.registry import get_host

    spec = get_host().get(args.kind, args.name)
    config_cls = spec.config_class()
    defaults: dict = {}
    if config_cls is not None:
        from omegaconf import OmegaConf

        defaults = OmegaConf.to_container(OmegaConf.structured(config_cls), resolve=True)
    doc = (getattr(spec.load(), "__doc__", "") or "").strip()
    if args.json:
        info = {
            "kind": spec.kind, "name": spec.name, "provider": spec.provider, "version": spec.version,
            "target": spec.target_name, "summary": spec.summary, "doc": doc, "config": defaults,
        }
        print(json.dumps(info, indent=2, default=str))
        return 0
    import yaml

    print(f"{spec.kind[:-1]} '{spec.name}' from {spec.provider} {spec.version} ({spec.target_name})")
    print(spec.summary)
    if doc and doc.splitlines()[0] != spec.summary:
        print("\n" + doc)
    print("\ndefault config:")
    print(yaml.safe_dump({"name": spec.name, **defaults}, sort_keys=False).rstrip())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from medvlsam2.core.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from medvlsam2.core.config import load_config
    from medvlsam2.core.run import fit

    cfg = None if args.resume else load_config(args.config, args.overrides)
    if args.resume and (args.config or args.overrides):
        print("medvlsam2: --resume uses the run's own config.yaml; --config and overrides are ignored", file=sys.stderr)
    folder = fit(cfg, only_stage=args.stage, resume=args.resume)
    print(f"run folder: {folder}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medvlsam2.core.config import load_config
    from medvlsam2.core.run import evaluate

    cfg = load_config(args.config, args.overrides)
    metrics = evaluate(cfg, args.ckpt, split="validation" if args.command == "validate" else "test")
    for name, value in sorted(metrics.items()):
        print(f"{name}\t{value:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medvlsam2.core.export import export

    print(f"exported to {export(args.ckpt, args.out)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medvlsam2.core.predict import Request, predict

    request = Request(task=args.task, text=args.text, points=args.points, box=args.box, overlay=args.overlay)
    failed = predict(args.model, args.volume, request, args.out)
    return 1 if failed else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from medvlsam2.core.serve import serve

    serve(args.model, host=args.host, port=args.port, demo_data=args.demo_data)
    return 0


def _cmd_build_demo(args: argparse.Namespace) -> int:
    from medvlsam2.plugins.tasks.data.demo import build_demo_data

    manifest = build_demo_data(
        args.out, num_cases=args.cases, num_ct_cases=args.ct_cases, seed=args.seed, force=args.force
    )
    print(f"demo data: {manifest}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import shlex

    from medvlsam2.core.benchmark import run_benchmark

    command = " ".join(["medvlsam2 benchmark --config", shlex.quote(args.config), *map(shlex.quote, args.overrides)])
    folder = run_benchmark(args.config, args.overrides, command=command, report_only=args.report_only)
    print(f"benchmark folder: {folder}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medvlsam2.core.demo import run_demo

    results = run_demo(args.out, quick=args.quick, configs=args.config, overrides=args.overrides)
    print(f"results: {results}")
    print(f"samples: {results.parent / 'samples.md'}; pictures: {results.parent / 'pictures'}; model: {results.parent / 'model'}")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file; repeat to merge")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvlsam2",
        description="MedVL-SAM2: 3D medical vision-language models with a SAM2 volumetric mask decoder.",
    )
    parser.add_argument("--version", action="version", version=f"medvlsam2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="every registered plugin: kind, name, provider, version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("list", help="names of one plugin kind, e.g. `list encoders 'vit*'`")
    p.add_argument("kind", help="encoders, projectors, llms, decoders, tasks or data_formats")
    p.add_argument("glob", nargs="?", default="*", help="shell-style pattern (default: *)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="a plugin's summary and default config")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("config", help="print the resolved, validated run config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("fit", help="train every stage of a run config (Lightning)")
    _add_config_args(p)
    p.add_argument("--stage", help="run only this stage (from the previous stage's weights, if any)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=_cmd_fit)

    for name, text in (("validate", "score every task on the validation split"), ("test", "score every task on the test split")):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--ckpt", help="weights: a .ckpt file or an export folder (default: the model as built)")
        p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="the embedded default: build data, train every task, evaluate, export")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a short smoke version on a few cases and steps")
    _add_config_args(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    q = data_sub.add_parser("build-demo", help="write the demo dataset (real MNI152 anatomy + CT phantoms)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--cases", type=int, default=24, help="brain cases (default 24)")
    q.add_argument("--ct-cases", type=int, default=8, help="CT phantom cases (default 8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true", help="rebuild even when the folder holds the same build")
    q.set_defaults(func=_cmd_build_demo)

    p = sub.add_parser("benchmark", help="train and score a grid of models and peers; CSV, Markdown and plots")
    p.add_argument("--config", required=True, metavar="FILE", help="benchmark YAML, e.g. configs/benchmark/encoders.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides of the benchmark config")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished jobs; run nothing")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("export", help="adapter + trainables.safetensors + config + model card from a checkpoint")
    p.add_argument("--ckpt", required=True, help="RUN/checkpoints/last.ckpt")
    p.add_argument("--out", required=True, help="export folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="masks and answers for a volume (or a folder / datalist of volumes)")
    p.add_argument("--model", required=True, help="an export folder or a .ckpt")
    p.add_argument("--volume", required=True, help="NIfTI/NRRD file, a folder of them, or a datalist (.json/.txt)")
    p.add_argument("--task", required=True, help="a task of the model, e.g. semantic_seg")
    p.add_argument("--text", help="the text prompt (class name, description or question)")
    p.add_argument("--points", help="'i,j,k,label;...' voxel indices of the file; label 1 foreground, 0 background")
    p.add_argument("--box", help="'i0,j0,k0,i1,j1,k1' inclusive voxel indices of the file")
    p.add_argument("--overlay", action="store_true", help="also write PNGs of key slices with the mask outline")
    p.add_argument("--out", required=True, help="output folder (mask.nii.gz, answer.json)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("serve", help="the web app and HTTP API: load a volume, click, box, ask, download the mask")
    p.add_argument("--model", required=True, help="an export folder or a .ckpt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--demo-data", help="a demo data folder (with demo.json) to offer its cases; default: the model's own")
    p.set_defaults(func=_cmd_serve)
    return parser


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--points -1,2,3,1`` -> ``--points=-1,2,3,1``: argparse reads a value starting with '-'
    as an option, so a negative coordinate would get a usage message instead of the prompt
    check that names the point."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--points", "--box") and len(arg) > 1 and arg[0] == "-" and (arg[1].isdigit() or arg[1] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    if not args.debug:
        # Third-party deprecation and advice warnings are noise for a user of the command line.
        import os
        import warnings

        warnings.filterwarnings("ignore", module=r"(transformers|lightning|torch|peft|monai|timm|sam2|hydra)(\.|$)")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return func(args)
    except MedVLError as err:
        if args.debug:
            raise
        print(f"medvlsam2: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunInterrupted as stop:
        print(f"medvlsam2: {stop}", file=sys.stderr)
        return EXIT_SIGNAL.get(stop.signal_name, 130)
    except KeyboardInterrupt:
        print("medvlsam2: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal bug: one line unless --debug
        if args.debug:
            raise
        print(
            f"medvlsam2: internal error: {type(err).__name__}: {one_line(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
