"""The `medformer` command: one entry point, one subcommand per step of the workflow.

Every run command takes ``--config FILE``, ``--set key.path=value`` (repeatable), ``--device``,
``--seed`` and ``--output`` with the same meaning. Errors a user can fix (bad data, bad config) print
one line naming the file or key and exit with status 2; commands not available yet exit with 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from medformer import __version__
from medformer.errors import MedformerError

NOT_AVAILABLE = 3


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.batch_size=64 (repeatable)",
        )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="compute device (default: auto)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    p.add_argument("--output", "-o", metavar="DIR", default=None, help="run folder for results")


def _planned(name: str, what: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(
            f"medformer {name}: {what} is not available yet in medformer {__version__}; "
            "see the README for the commands that work today.",
            file=sys.stderr,
        )
        return NOT_AVAILABLE

    return run


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from medformer.data.inspect import inspect_path

    reports = inspect_path(args.path, skip_bad=args.skip_bad, progress=not args.quiet, size=args.size)
    text = "\n\n".join(r.format() for r in reports)
    print(text)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "inspect.json").write_text(json.dumps([r.to_dict() for r in reports], indent=1))
        (out / "inspect.txt").write_text(text + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medformer.demo import run_demo

    size = "quick" if args.quick else "full" if args.full else "default"
    output = args.output or "runs/demo"
    run_demo(output, size, seed=args.seed or 0, device=args.device or "auto", threads=args.threads)
    return 0


def _run_config(cls, args: argparse.Namespace, **extra):
    """Config file + flags (``--seed`` etc. fill keys the file leaves out) + ``--set`` overrides."""
    from medformer.config import load_config

    flags = {"seed": args.seed, "device": args.device, "output": args.output}
    overrides = [f"{k}={v}" for k, v in extra.items() if v is not None] + list(args.overrides)
    return load_config(cls, args.config, overrides, **flags)


def cmd_finetune(args: argparse.Namespace) -> int:
    from medformer.finetune import FinetuneConfig, run_finetune

    config = _run_config(
        FinetuneConfig,
        args,
        **{
            "model.init": args.init,
            "finetune.label_fraction": args.label_fraction,
            "finetune.label_seed": args.label_seed,
        },
    )
    results = run_finetune(config, resume=args.resume)
    _print_results(results, config.output)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medformer.pretrain import PretrainConfig, run_pretrain

    config = _run_config(PretrainConfig, args)
    summary = run_pretrain(config, resume=args.resume)
    for key, value in sorted(summary.get("losses", {}).items()):
        print(f"{key:40s} {value:.4f}")
    print(f"pre-trained model: {summary['model']}")
    print(f"fine-tune it with: medformer finetune --init {summary['output']} --config ...")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from medformer.adapt import AdaptConfig, run_adapt

    extra = {"model.init": args.init}
    if args.collection:
        extra["data"] = json.dumps([{"path": args.collection}])
    config = _run_config(AdaptConfig, args, **extra)
    results = run_adapt(config)
    p = results["parameters"]
    print(
        f"trained {p['trained']} of {p['total']} parameters ({100 * p['fraction']:.3f}%; "
        f"full fine-tuning: {p['full_finetuning']})"
    )
    _print_results({k: v for k, v in results.items() if k in ("val", "test")}, config.output)
    print(f"adapted model: {Path(config.output) / 'model'}")
    return 0


def cmd_templates_export(args: argparse.Namespace) -> int:
    from medformer.errors import ConfigError
    from medformer.finetune import model_folder
    from medformer.models import Medformer
    from medformer.models.templates import export_templates

    folder = model_folder(args.model)
    model = Medformer.from_pretrained(folder)
    if model.templates is None:
        raise ConfigError(
            f"{folder}: this model has no modality templates (pre-train it with task: brainmvp)"
        )
    output = Path(args.output or Path(folder) / "templates")
    for path in export_templates(model.templates, output, args.spacing):
        print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from medformer.generate.train import GenerateConfig, run_generate

    config = _run_config(GenerateConfig, args)
    results = run_generate(config)
    for split in ("val", "test"):
        for name, key in (("translator", split), ("copy source", f"{split}_copy_source")):
            for metric, value in sorted(results.get(key, {}).items()):
                print(f"{split:5s} {name:12s} {metric:16s} {value:.4f}")
    print(f"translator: {Path(config.output) / 'translator'}")
    print(f"report: {Path(config.output) / 'report.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medformer.finetune import evaluate_run
    from medformer.runtime import seed_everything

    seed_everything(args.seed or 0)
    if (Path(args.run) / "demo.json").exists():  # a demo run folder: rebuild its comparison report
        from medformer.demo import write_demo_report

        _print_results(write_demo_report(args.run, device=args.device), args.run)
        return 0
    config = Path(args.run) / "config.yaml"
    if config.exists() and "\npretext:" in "\n" + config.read_text():  # a pre-training run: no labels
        from medformer.evaluate.report import write_pretrain_report

        _print_results(write_pretrain_report(args.run, args.output), args.output or args.run)
        return 0
    output = args.output or (str(Path(args.run) / "tent") if args.tent else None)
    results = evaluate_run(args.run, model_dir=args.model, device=args.device, output=output, tent=args.tent)
    _print_results(results, output or args.run)
    return 0


def _print_results(results: dict, run: str) -> None:
    for split, metrics in results.items():
        for key, value in sorted(metrics.items()):
            print(f"{split:5s} {key:40s} {value:.4f}")
    print(f"report: {Path(run) / 'report.html'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medformer",
        description="Multitask, multimodal self-supervised pre-training for 2D and 3D medical images.",
    )
    parser.add_argument("--version", action="version", version=f"medformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="look at data before training")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    insp = data_sub.add_parser(
        "inspect", help="what a path holds: collections, splits, modalities, shapes, labels, problems"
    )
    insp.add_argument(
        "path", help="MedMNIST .npz, folder of them, CSV manifest, dataset.json, or subject folder"
    )
    insp.add_argument(
        "--skip-bad", action="store_true", help="list bad studies instead of stopping at the first"
    )
    insp.add_argument("--size", type=int, default=28, help="MedMNIST image size to look for (default 28)")
    insp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _common(insp, config=False)
    insp.set_defaults(func=cmd_data_inspect)
    data.set_defaults(func=lambda a: (data.print_help(), 1)[1])

    planned = {
        "predict": ("apply a fine-tuned model to new images", "prediction"),
        "benchmark": ("speed, memory and accuracy benchmarks", "the benchmark command"),
    }
    demo = sub.add_parser("demo", help="the workflow on built-in simulated brain MRI, in minutes on a CPU")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small cohort and a few steps (about a minute)")
    size.add_argument("--full", action="store_true", help="a bigger cohort, grid and model (for a GPU)")
    demo.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: one per core)")
    _common(demo, config=False)
    demo.set_defaults(func=cmd_demo)

    pt = sub.add_parser(
        "pretrain", help="self-supervised pre-training on unlabeled collections (2D and 3D together)"
    )
    _common(pt)
    pt.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    pt.set_defaults(func=cmd_pretrain)

    ft = sub.add_parser("finetune", help="fine-tune a model on one or many labelled tasks")
    _common(ft)
    ft.add_argument(
        "--init", metavar="DIR", help="start from a saved model or a run folder (e.g. runs/pretrain)"
    )
    ft.add_argument(
        "--label-fraction", type=float, metavar="F", help="use a stratified fraction of the labels"
    )
    ft.add_argument("--label-seed", type=int, metavar="S", help="which label subset (default 0)")
    ft.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    ft.set_defaults(func=cmd_finetune)

    tp = sub.add_parser("templates", help="learned modality templates (BrainMVP)")
    tp_sub = tp.add_subparsers(dest="templates_command", metavar="SUBCOMMAND")
    tx = tp_sub.add_parser("export", help="write each modality template as NIfTI and mid-slices as PNG")
    tx.add_argument(
        "--model", required=True, metavar="DIR", help="a saved model or a pre-training run folder"
    )
    tx.add_argument("--output", "-o", metavar="DIR", help="where to write (default: <model>/templates)")
    tx.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="voxel size written into the NIfTI (default 1 mm)",
    )
    tx.set_defaults(func=cmd_templates_export)
    tp.set_defaults(func=lambda a: (tp.print_help(), 1)[1])

    gen = sub.add_parser(
        "generate", help="train a cross-modal translator (missing-modality synthesis) and score it"
    )
    _common(gen)
    gen.set_defaults(func=cmd_generate)

    ad = sub.add_parser(
        "adapt",
        help="adapt a trained model to a new site or collection (adapter-only: new latent embeddings)",
    )
    _common(ad)
    ad.add_argument("--init", metavar="RUN", help="the trained model: a run folder or a saved model folder")
    ad.add_argument("--collection", metavar="PATH", help="the new collection (sets data to this one entry)")
    ad.set_defaults(func=cmd_adapt)

    ev = sub.add_parser("evaluate", help="metrics and an HTML/Markdown report for a run")
    ev.add_argument("--run", required=True, metavar="DIR", help="a run folder (written by finetune)")
    ev.add_argument(
        "--model", metavar="DIR", help="model folder to score (default: the run's best/, else model/)"
    )
    ev.add_argument(
        "--tent",
        action="store_true",
        help="test-time adaptation: before scoring a split, adapt the model's LayerNorms to its images "
        "by entropy minimisation (TENT; labels unused); report in RUN/tent unless --output",
    )
    _common(ev, config=False)
    ev.set_defaults(func=cmd_evaluate)

    for name, (help_text, what) in planned.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, config=name != "predict")
        p.set_defaults(func=_planned(name, what))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MedformerError as e:
        print(f"medformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medformer: interrupted", file=sys.stderr)
        return 130
