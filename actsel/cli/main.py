"""The ``actsel`` command: ``actsel run`` for the whole pipeline, one subcommand per stage.

Settings come from a TOML or YAML file (``--config``), then from the flags below,
then from ``--set section.key=value``; later sources override earlier ones.
On failure the command prints one line, ``actsel: error: ...``, and exits 1
(``-v`` also prints the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

STAGES = ("run", "extract", "utility", "correlate", "select", "report")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from err

    return parse


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("task and model")
    source.add_argument("--config", help="TOML or YAML file with the run settings")
    source.add_argument("--task", help="built-in task name (see `actsel tasks`); default: demo")
    source.add_argument("--files", nargs="+", metavar="FILE", help="your own task: a CSV/JSONL/parquet file, or pool and eval files")
    source.add_argument("--hub", help="your own task: a Hugging Face dataset id (must be cached when offline)")
    source.add_argument("--data-dir", help="folder with the built-in tasks' files (default: $ACTSEL_DATA_DIR)")
    source.add_argument("--n-pool", type=int, help="number of candidate examples drawn from the pool")
    source.add_argument("--n-eval", type=int, help="number of evaluation queries")
    source.add_argument("--model", help="model spec (see `actsel models`); default: smollm2-135m")
    source.add_argument("--device", help="torch device, for example cpu or cuda")
    source.add_argument("--dtype", help="model dtype: float32, bfloat16 or float16 (statistics are float64 regardless)")
    stages = parser.add_argument_group("stages")
    stages.add_argument("--hooks", type=_csv(str), help="comma-separated hook names, for example hook_mlp_out,hook_resid_post")
    stages.add_argument("--layers", type=_csv(int), help="comma-separated layer indices (default: all)")
    stages.add_argument("--masks", type=_csv(str), help="comma-separated attention masks: causal,isolated,isolated_sink,label_blind,sink_free")
    stages.add_argument("--estimator", help="utility estimator: one_shot, conditional or influence")
    stages.add_argument("--strategies", type=_csv(str), help="comma-separated selection strategies")
    stages.add_argument("--budgets", type=_csv(int), help="comma-separated annotation budgets")
    stages.add_argument("--seeds", type=_csv(int), help="comma-separated seeds for selection")
    stages.add_argument("--no-selection", action="store_true", help="skip the selection stage in `actsel run`")
    parser.add_argument("-o", "--output", help="output folder (default: runs/<task>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key; the value is read as JSON when it parses, else as text")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsel", description="Activation statistics vs in-context example utility.")
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "run every stage and write report.html (resumes from caches)",
        "extract": "activation statistics of the pool examples",
        "utility": "utility of the pool examples as demonstrations",
        "correlate": "Spearman correlation per feature, with figures",
        "select": "selective annotation and k-shot evaluation per strategy",
        "report": "write report.html from the files in the output folder",
    }
    for name in STAGES:
        _add_run_options(commands.add_parser(name, help=helps[name], description=helps[name]))
    models = commands.add_parser("models", help="list model specs")
    models.add_argument("--all", action="store_true", help="also list every TransformerLens official name")
    commands.add_parser("tasks", help="list built-in tasks")
    return parser


def config_from_args(args: argparse.Namespace):
    """Merge the config file, the flags and ``--set`` overrides into a validated ``RunConfig``."""
    from actsel.pipeline.config import apply_override, config_from_dict, read_config_file

    data = read_config_file(args.config) if args.config else {}
    task = data.setdefault("task", {})
    if args.task or args.files or args.hub:
        for key in ("name", "files", "hub"):
            task.pop(key, None)
        if args.task:
            task["name"] = args.task
        if args.files:
            task["files"] = args.files
        if args.hub:
            task["hub"] = args.hub
    flag_map = {
        ("task", "data_dir"): args.data_dir,
        ("task", "n_pool"): args.n_pool,
        ("task", "n_eval"): args.n_eval,
        ("model", "spec"): args.model,
        ("model", "device"): args.device,
        ("model", "dtype"): args.dtype,
        ("features", "hooks"): args.hooks,
        ("features", "layers"): args.layers,
        ("features", "masks"): args.masks,
        ("utility", "estimator"): args.estimator,
        ("selection", "strategies"): args.strategies,
        ("selection", "budgets"): args.budgets,
        ("selection", "seeds"): args.seeds,
    }
    for (section, key), value in flag_map.items():
        if value is not None:
            data.setdefault(section, {})[key] = value
    if args.no_selection:
        data.setdefault("selection", {})["enabled"] = False
    for assignment in args.set:
        apply_override(data, assignment)
    if args.output:
        data["output"] = args.output
    elif "output" not in data:
        name = data.get("task", {}).get("name") or "custom"
        data["output"] = f"runs/{name.replace(':', '-')}"
    return config_from_dict(data)


def _configure_logging(args: argparse.Namespace) -> None:
    quiet = getattr(args, "quiet", False)
    verbose = getattr(args, "verbose", 0)
    level = logging.WARNING if quiet or verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0 and not quiet:
        logging.getLogger("actsel").setLevel(logging.INFO)
    for noisy in ("transformers", "datasets", "huggingface_hub", "root"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _list_models(show_all: bool) -> None:
    from actsel.models import list_models

    for row in list_models(include_official=True):
        if not show_all and not row.available_offline and row.source.startswith("TransformerLens"):
            continue
        state = "available offline" if row.available_offline else "needs the hub"
        print(f"{row.spec:45s} {row.source:40s} {state}")
    if not show_all:
        print("(TransformerLens official names that are not cached are hidden; --all lists them)")


def _list_tasks() -> None:
    from actsel.tasks import list_tasks

    for name in list_tasks():
        print(name)
    print("mit-movies:<Slot> picks another slot than Genre; use --files or --hub for your own data")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "models":
        _list_models(args.all)
        return 0
    if args.command == "tasks":
        _list_tasks()
        return 0

    from actsel.pipeline.stages import Run

    config = config_from_args(args)
    run = Run(config, progress=not args.quiet)
    run.write_manifest()
    if args.command == "run":
        path = run.run_all()
        print(f"Report: {path}")
    elif args.command == "extract":
        table = run.extract()
        print(f"Features: {table.n_examples} examples x {table.n_features} features -> {run.output / 'features.parquet'}")
    elif args.command == "utility":
        result = run.utility()
        print(f"Utility ({result.estimator}, {result.metric}) of {len(result.uids)} candidates -> {run.output / 'utility.parquet'}")
    elif args.command == "correlate":
        correlations = run.correlate()
        print(f"{len(correlations)} correlations -> {run.output / 'correlations.csv'}")
    elif args.command == "select":
        table = run.select()
        print(table.to_string(index=False))
    elif args.command == "report":
        print(f"Report: {run.report()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print("actsel: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # the one place that turns any failure into a one-line message
        if getattr(args, "verbose", 0):
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"actsel: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
