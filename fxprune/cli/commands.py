"""The ``fxprune`` command line: thin typer commands over the Python API.

Nothing heavy is imported at module level (torch takes seconds), so ``fxprune --help`` is instant;
each command imports what it needs. Bad input ends with ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="fxprune",
    help="Structured pruning for PyTorch: trace a model, group coupled channels, emit a smaller exact model.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
)

EXIT_BAD_INPUT = 2


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (imported lazily: they live next to torch code)."""
    from fxprune.artifacts import OutputExistsError
    from fxprune.checkpoints.folder import CheckpointError
    from fxprune.passes.registry import PassError
    from fxprune.selection.budget import SelectionError
    from fxprune.tracing.tracer import TraceError

    from .bench import BenchError
    from .deploy import DeployError
    from .modelfile import ModelFileError
    from .robust import RobustnessError
    from .runconfig import OptionError

    return (ModelFileError, TraceError, PassError, SelectionError, OutputExistsError, OptionError, BenchError,
            DeployError, RobustnessError, CheckpointError)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input -> 'error: message' on stderr and exit code 2, without a traceback."""
    try:
        yield
    except _bad_input_errors() as exc:
        if _rank() != 0:  # under torchrun every rank meets the same bad input: rank 0 reports it and torchrun
            time.sleep(RANK_ZERO_REPORTS_S)  # ends this rank; an error of this rank alone is printed after the wait
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


RANK_ZERO_REPORTS_S = 60.0  # how long a rank other than 0 leaves a bad input to rank 0's message


def _rank() -> int:
    from fxprune.recovery.distributed import launch_rank

    return launch_rank()


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, quiet=quiet)  # bound now: unaffected by later stderr redirection


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _parse_opts(pairs: list[str]) -> dict[str, str]:
    from .runconfig import OptionError

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--opt expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_ratio_for(pairs: list[str]) -> dict[str, float]:
    from .runconfig import OptionError

    out: dict[str, float] = {}
    for pair in pairs:
        pattern, sep, value = pair.rpartition("=")
        try:
            out[pattern.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern.strip():
            raise OptionError(f"--ratio-for expects 'PATTERN=RATIO' (e.g. 'layer4.*=0.7'), got {pair!r}")
    return out


def _default_out(model_file: Path, method: str, ratio: float) -> Path:
    return Path("runs") / f"{model_file.stem}-{method.replace(':', '.')}-{ratio:g}"


ModelArg = Annotated[Path, typer.Argument(help="the model file: defines model() and example_inputs(); see the README",
                                          show_default=False)]
SourceArg = Annotated[Path, typer.Argument(help="the model file (defines model() and example_inputs(); see the "
                                           "README), or a Hugging Face model folder (config.json + *.safetensors), "
                                           "pruned from disk", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object to stdout instead of tables")]
CalibOpt = Annotated[Optional[Path], typer.Option("--calib", help="a Hugging Face folder: calibration text (a plain-"
                                                  "text file) for the passes that read activations (act, thinet, "
                                                  "lasso, depth, experts), run through the model one decoder layer "
                                                  "at a time from disk",
                                                  show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress and no tables")]


@app.command()
def run(
    model_file: SourceArg,
    method: Annotated[str, typer.Option("--pass", "-p",
                                        help="scoring pass (see `fxprune passes`) or package.module:Class")] = "l1",
    ratio: Annotated[float, typer.Option("--ratio", "-r",
                                         help="fraction of each group's channels to remove, in [0, 1)")] = 0.5,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: runs/MODEL-PASS-RATIO)",
                                                show_default=False)] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option("--finetune-epochs", "--epochs",
                                                           help="recovery epochs after pruning (needs train_loader()); "
                                                           "default: recovery for a number of epochs chosen from the "
                                                           "data when the model file defines train_loader()",
                                                           show_default=False)] = None,
    no_recover: Annotated[bool, typer.Option("--no-recover", help="no recovery, even when the model file can "
                                             "train")] = False,
    onnx: Annotated[bool, typer.Option("--onnx", help="also write model.onnx, checked with onnxruntime against "
                                       "model.pt2 (pip install \"fxprune[onnx]\")")] = False,
    attack: Annotated[Optional[str], typer.Option("--attack", help="also report robustness before and after: pgd "
                                                  "(white-box L-inf PGD on val_loader(); see `fxprune eval`)",
                                                  show_default=False)] = None,
    eps: Annotated[float, typer.Option("--eps", help="--attack's L-inf radius, in input units")] = 0.03,
    attack_steps: Annotated[int, typer.Option("--attack-steps", help="--attack's PGD steps")] = 40,
    allow_inexact: Annotated[bool, typer.Option("--allow-inexact", help="also prune groups where removing a "
                                                "channel is not exactly the masked model (behind a normalisation "
                                                "over channels); recover afterwards")] = False,
    recover: Annotated[Optional[str], typer.Option("--recover", help="recovery: finetune (inherited weights), "
                                                   "scratch-e or scratch-b (re-initialised; Liu et al. 2019 budgets); "
                                                   "default: the pass's own (scratch: scratch-b), else finetune",
                                                   show_default=False)] = None,
    distill: Annotated[Optional[bool], typer.Option("--distill/--no-distill", help="distil from the unpruned model "
                                                    "during recovery (--kd-alpha, --kd-temperature); default: the "
                                                    "pass's own (tas: on), else off", show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", help="recovery learning rate (SGD, cosine schedule)")] = 0.01,
    scratch_lr: Annotated[Optional[float], typer.Option("--scratch-lr", help="scratch-e / scratch-b's own learning "
                                                        "rate (Liu et al. 2019: 0.1 from scratch, 1e-3 fine-tuning); "
                                                        "default: --lr", show_default=False)] = None,
    scratch_b_cap: Annotated[Optional[float], typer.Option("--scratch-b-cap", help="Scratch-B trains the full "
                                                           "model's budget (--epochs x the MACs removed), at most "
                                                           "this factor x --epochs; default: no cap",
                                                           show_default=False)] = None,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", help="distillation's weight: (1 - a) task + a T^2 KL")] = 0.9,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="distillation's temperature T")] = 4.0,
    max_grad_norm: Annotated[Optional[float], typer.Option("--max-grad-norm", help="recovery clips the total "
                                                           "gradient norm to this before every step (0: never); "
                                                           "default: 5 when fine-tuning, never from scratch",
                                                           show_default=False)] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="under torchrun, recovery shards the pruned model and the "
                                       "teacher across the processes with PyTorch's FSDP2 (each holds 1/world of "
                                       "them) instead of replicating them (DDP): a model larger than one device "
                                       "recovers on several; not resumable")] = False,
    opt: Annotated[Optional[list[str]], typer.Option("--opt", help="a pass option as key=value (repeatable)",
                                                     show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue a killed run of the same command "
                                         "from its last finished epoch (kept in OUT.resume beside the output); "
                                         "--no-resume starts over")] = True,
    scope: Annotated[Optional[str], typer.Option("--scope", help="group (same fraction per group) or global "
                                                 "(one threshold); default: the pass's paper default",
                                                 show_default=False)] = None,
    ratio_for: Annotated[Optional[list[str]], typer.Option("--ratio-for", help="per-layer ratio, "
                                                           "'PATTERN=RATIO' (repeatable)", show_default=False)] = None,
    protect: Annotated[Optional[list[str]], typer.Option("--protect", help="layer-name pattern never pruned "
                                                         "(repeatable)", show_default=False)] = None,
    min_channels: Annotated[int, typer.Option("--min-channels", help="channels every group keeps at least")] = 1,
    min_keep: Annotated[Optional[float], typer.Option("--min-keep", help="fraction of every group always kept "
                                                      "(default: the pass's; slimming 0.1)",
                                                      show_default=False)] = None,
    round_to: Annotated[int, typer.Option("--round-to", help="kept positions per group: a multiple of N")] = 1,
    group_width_to: Annotated[Optional[int], typer.Option("--group-width-to", help="a grouped convolution's group "
                                                          "width kept a multiple of N (or a power of two "
                                                          "below N); default: the device's, 8 on CPU",
                                                          show_default=False)] = None,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="fraction of MACs to keep "
                                                         "(replaces --ratio)", show_default=False)] = None,
    target_params: Annotated[Optional[float], typer.Option("--target-params", help="fraction of parameters to "
                                                           "keep (replaces --ratio)", show_default=False)] = None,
    target_latency: Annotated[Optional[float], typer.Option("--target-latency", help="fraction of the latency to "
                                                            "keep on the example inputs, on --device, as a latency "
                                                            "model measured there predicts (replaces --ratio)",
                                                            show_default=False)] = None,
    target: Annotated[str, typer.Option("--target", help="what compaction rewrites: graph (the traced graph), "
                                        "modules (the model's own modules, resized: detectors and other models "
                                        "torch.export cannot trace whole), auto (graph when it traces)")] = "auto",
    uniform: Annotated[Optional[bool], typer.Option("--uniform-across-layers/--per-layer-widths",
                                                    help="every layer keeps the same count of each kind of group "
                                                    "(one width per kind: what a Hugging Face config.json can "
                                                    "describe); default: on for a model folder, off for a model "
                                                    "file", show_default=False)] = None,
    calib: CalibOpt = None,
    calib_samples: Annotated[Optional[int], typer.Option("--calib-samples", help="--calib's sequences (default "
                                                         "64)", show_default=False)] = None,
    seq_length: Annotated[Optional[int], typer.Option("--seq-length", help="tokens per sequence of --calib and "
                                                      "--eval-text (default 256)", show_default=False)] = None,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="a Hugging Face folder: perplexity before "
                                                      "and after pruning on this text file (report.json), streamed "
                                                      "layer by layer", show_default=False)] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune a model file, optionally fine-tune, evaluate before/after, and write the output folder; or prune a
    Hugging Face model folder from disk into one that from_pretrained loads."""
    from .language import text_data
    from .runconfig import RunConfig

    with _user_errors():  # a malformed --ratio-for is bad input for a folder as for a model file
        budget = {"scope": scope, "ratio_for": _parse_ratio_for(ratio_for or []), "protect": tuple(protect or ()),
                  "min_channels": min_channels, "min_keep": min_keep, "round_to": round_to,
                  "group_width_to": group_width_to, "target_macs": target_macs,
                  "target_params": target_params, "target_latency": target_latency}
    if model_file.is_dir():  # a Hugging Face folder: one width per kind of layer unless --per-layer-widths
        given = {"finetune_epochs": finetune_epochs, "recover": recover, "distill": distill, "onnx": onnx,
                 "fsdp": fsdp,
                 "scratch_lr": scratch_lr, "scratch_b_cap": scratch_b_cap,
                 "attack": attack, "target_latency": target_latency}
        with _user_errors():
            text = text_data(calib, eval_text, calib_samples, seq_length, folder=True)
        _run_folder(model_file, method, ratio, out or _default_out(model_file, method, ratio), opt or [],
                    {**budget, "uniform_across_layers": True if uniform is None else uniform}, given, target,
                    allow_inexact, force, quiet, as_json, text)
        return
    budget.update(target=target, uniform_across_layers=bool(uniform))
    with _user_errors():
        text_data(calib, eval_text, calib_samples, seq_length, folder=False)
        cfg = RunConfig(model_file, method, ratio, out or _default_out(model_file, method, ratio), finetune_epochs,
                        lr, _parse_opts(opt or []), device, force, budget, recover, distill, no_recover, allow_inexact,
                        onnx=onnx, attack=attack, eps=eps, attack_steps=attack_steps, resume=resume,
                        scratch_lr=scratch_lr, scratch_b_cap=scratch_b_cap, kd_alpha=kd_alpha,
                        kd_temperature=kd_temperature, max_grad_norm=max_grad_norm, fsdp=fsdp)
        report = _run(cfg, quiet or as_json or _rank() != 0)
    if _rank() != 0:  # rank 0 prints and writes; this rank trained with it
        return
    report["out"] = str(cfg.out)
    if as_json:
        _print_json(report)
    elif not quiet:
        from rich.console import Console

        from .ui import summary_table

        Console().print(summary_table(report))


_NOISY_TORCH_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")


def _quiet_torch_logs() -> None:
    """torch.export logs graph dumps while it fails on a model; the CLI reports the failure itself."""
    import logging

    for name in _NOISY_TORCH_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_folder(folder: Path, method: str, ratio: float, out: Path, opt: list[str], budget: dict[str, Any],
                given: dict[str, Any], target: str, allow_inexact: bool, force: bool, quiet: bool,
                as_json: bool, text: Any) -> None:
    """``fxprune run DIR``: a Hugging Face model folder (``fxprune.cli.folder``)."""
    from .folder import check_folder_options, run_folder
    from .ui import RichFeedback

    _quiet_torch_logs()
    with _user_errors():
        check_folder_options(given, target)
        if quiet or as_json or _rank() != 0:
            report = run_folder(folder, method, ratio, out, _parse_opts(opt), budget, allow_inexact, force,
                                text=text)
        else:
            with RichFeedback(_console(False)) as feedback:
                report = run_folder(folder, method, ratio, out, _parse_opts(opt), budget, allow_inexact, force,
                                    feedback, text)
    if as_json:
        _print_json(report)
    elif not quiet:
        from rich.console import Console

        from .ui import folder_table

        Console().print(folder_table(report))


def _run(cfg: Any, quiet: bool) -> dict[str, Any]:
    from .pipeline import run as run_pipeline
    from .runconfig import check
    from .ui import RichFeedback

    _quiet_torch_logs()
    if quiet:
        return run_pipeline(cfg)[0]
    check(cfg)  # bad input fails before the progress display starts
    with RichFeedback(_console(False)) as feedback:
        return run_pipeline(cfg, feedback)[0]


@app.command()
def inspect(
    model_file: SourceArg,
    as_json: JsonOpt = False,
    graph: Annotated[bool, typer.Option("--graph", help="print every node with what each stage decided there: its "
                                        "groups per axis, why frozen, and with --pass the scores, masks and kept "
                                        "channels (the fxprune.* annotations on the graph)")] = False,
    method: Annotated[Optional[str], typer.Option("--pass", "-p", help="also score and select with this pass "
                                                  "(pruned in memory, nothing written, no recovery)",
                                                  show_default=False)] = None,
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="the budget for --pass")] = 0.5,
    calib: CalibOpt = None,
) -> None:
    """Show the channel groups of a model file: size, producing and consuming layers, prunable or frozen and why;
    for a Hugging Face folder with --calib, also each decoder block's importance on that text and, for a
    mixture-of-experts model, each routed expert's share of the tokens."""
    from fxprune.measure import count_macs, count_params

    from ..annotations import dump
    from .modelfile import load_model_file
    from .notes import stderr_only_on_success

    if model_file.is_dir():
        _inspect_folder(model_file, as_json, graph, method, calib)
        return
    if calib is not None:
        with _user_errors():
            from .language import text_data

            text_data(calib, None, None, None, folder=False)
    with _user_errors():
        mf = load_model_file(model_file)
        mf.require("model", "example_inputs", why="inspect")
        _quiet_torch_logs()
        model, inputs = mf.model().eval(), mf.example_inputs()
        with stderr_only_on_success():
            if method is None:
                groups, used = _analysed(model, inputs, mf.dynamic_shapes())
            else:
                used = None
                groups = _scored_groups(mf, model, inputs, method, ratio)
    if graph:
        typer.echo(dump(groups.gm))
        return
    rows = groups.rows()
    info = {"model_file": str(model_file), "macs": count_macs(model, inputs), "params": count_params(model),
            "groups": rows, "unsupported_ops": sorted(groups.unsupported)}
    if used is not None:
        info["compaction"] = used
    shapes = groups.gm.meta.get("fxprune.input_shapes")
    info["input_axes"] = shapes.report() if shapes is not None else None
    info["blocks"] = _block_rows(groups.gm, info["macs"])
    if as_json:
        _print_json(info)
        return
    from rich.console import Console

    from .report import human
    from .ui import blocks_table, groups_table, input_axes_line

    prunable = sum(r["status"] == "prunable" for r in rows)
    title = (f"{model_file.name}: {len(rows)} channel groups, {prunable} prunable; "
             f"{human(info['macs'])} MACs, {human(info['params'])} params")
    console = Console()
    if used is not None and used["target"] == "modules":
        console.print(f"analysed from one real run, compacted by resizing its modules: {used['why']}")
    console.print(groups_table(rows, title))
    if info["input_axes"] is not None:
        console.print(input_axes_line(info["input_axes"]))
    if info["unsupported_ops"]:
        console.print("ops without a rule (their channels are frozen): " + ", ".join(info["unsupported_ops"]))
    if info["blocks"]:
        console.print(blocks_table(info["blocks"]))


def _inspect_folder(folder: Path, as_json: bool, graph: bool, method: str | None, calib: Path | None) -> None:
    """``fxprune inspect DIR`` for a Hugging Face model folder: its groups, analysed on the meta device."""
    from .folder import inspect_folder
    from .notes import stderr_only_on_success
    from .runconfig import OptionError

    _quiet_torch_logs()
    with _user_errors():
        if method is not None:
            raise OptionError("--pass on a Hugging Face folder: run `fxprune run DIR --pass ...` (it reads the "
                              "weights from disk and writes the pruned folder)")
        with stderr_only_on_success():
            groups, info = inspect_folder(folder)
        if calib is not None:
            from .language import block_rows, expert_rows

            info["blocks"] = block_rows(folder, calib)
            info["experts"] = expert_rows(folder, calib)
    if graph:
        from ..annotations import dump

        typer.echo(dump(groups.gm))
    elif as_json:
        _print_json(info)
    else:
        from rich.console import Console

        from .report import human
        from .ui import groups_table

        prunable = sum(r["status"] == "prunable" for r in info["groups"])
        Console().print(groups_table(info["groups"], f"{folder.name} ({info['architecture']}, on the meta device): "
                                     f"{len(info['groups'])} channel groups, {prunable} prunable; "
                                     f"{human(info['macs'])} MACs on 8 tokens, {human(info['params'])} params"))
        if "blocks" in info:
            from .language import blocks_importance_table, experts_table

            Console().print(blocks_importance_table(info["blocks"]))
            if info["experts"]:
                Console().print(experts_table(info["experts"]))


def _block_rows(gm: Any, total_macs: int) -> list[dict[str, Any]]:
    """The removable residual blocks of a traced graph (``fxprune.edits.blocks``), one JSON-able row each:
    ``macs`` on the example inputs and their share of ``total_macs``, ``params`` the parameter count only the
    block holds (``param_names`` those tensors)."""
    from fxprune.edits.blocks import residual_blocks

    params = dict(gm.named_parameters(remove_duplicate=False))
    return [{"name": b.name, "stage": b.stage, "macs": b.macs, "macs_share": b.macs / max(total_macs, 1),
             "params": sum(params[n].numel() for n in b.params if n in params), "param_names": list(b.params),
             "add": b.add, "skip": b.skip, "branch": b.branch} for b in residual_blocks(gm)]


def _analysed(model: Any, inputs: Any, dynamic_shapes: Any = None) -> tuple[Any, dict[str, str]]:
    """The channel groups as ``fxprune run --target auto`` sees them: of the traced graph, or, for a model
    torch.export cannot trace whole, of the record of one real run, with the sizes its code holds frozen."""
    import fxprune
    from fxprune.compaction.modules import freeze_code_sizes
    from fxprune.compaction.targets import trace_for

    gm, used = trace_for(model, inputs, "auto", dynamic_shapes)
    groups = fxprune.analyze(gm)
    if used["target"] == "modules":
        freeze_code_sizes(gm, groups, model)
    return groups, used


def _scored_groups(mf: Any, model: Any, inputs: Any, method: str, ratio: float) -> Any:
    """The analysis of ``model`` with ``method``'s scores, masks and selection written on its graph."""
    import fxprune
    from fxprune.passes.registry import load_pass
    from fxprune.selection.budget import check_ratio

    from .pipeline import model_file_data

    check_ratio(ratio)
    needs = tuple(getattr(load_pass(method), "needs", ()))
    if needs:
        mf.require(*needs, why=f"pass {method!r}")
    return fxprune.prune(model, inputs, method, ratio, **model_file_data(mf)).groups


def _pass_rows() -> list[dict[str, Any]]:
    import dataclasses
    import typing

    from fxprune.passes.registry import available_passes

    rows = []
    for name, cls in available_passes().items():
        hints = typing.get_type_hints(cls)
        options = [{"name": f.name, "type": getattr(hints.get(f.name), "__name__", str(hints.get(f.name))),
                    "default": f.default if f.default is not dataclasses.MISSING else None}
                   for f in dataclasses.fields(cls)]
        rows.append({"name": name, "description": cls.description, "scope": cls.scope, "options": options,
                     "presets": {k: dict(v) for k, v in getattr(cls, "presets", {}).items()},
                     "provider": f"{cls.__module__}:{cls.__qualname__}"})
    return rows


@app.command()
def passes(as_json: JsonOpt = False) -> None:
    """List every registered pass with its description and its options (with defaults)."""
    with _user_errors():
        rows = _pass_rows()
    if as_json:
        _print_json(rows)
        return
    from rich.console import Console

    from .ui import passes_table

    Console().print(passes_table(rows))


@app.command()
def bench(
    folder: Annotated[Path, typer.Argument(help="an output folder of `fxprune run`", show_default=False)],
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs per model, in all rounds")] = 50,
    rounds: Annotated[int, typer.Option("--rounds", help="interleaved rounds (original, pruned, ...): the "
                                        "spread is over rounds")] = 5,
    model: Annotated[Optional[Path], typer.Option("--model", help="take both models from this model file and "
                                                  "the folder's plan (a folder without .pt2: a detector)",
                                                  show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency and peak memory of the original vs the compacted model (CPU, and CUDA when present), and the
    speed-up next to the MACs reduction (their ratio: 1.0 = as much faster as smaller)."""
    from .bench import bench as bench_folder

    with _user_errors():
        rows = bench_folder(folder, repeats=repeats, rounds=rounds, model_file=model)
    if as_json:
        _print_json(rows)
        return
    from rich.console import Console

    from .ui import bench_table

    first = rows[0]
    Console().print(bench_table(rows, f"{folder}: {first['rounds']} interleaved rounds of {first['runs_per_round']} "
                                      f"runs per model on the saved example inputs, {first['threads']} CPU threads"))
    from .ui import bench_hint

    hint = bench_hint(rows)
    if hint:
        Console().print(hint)


@app.command("eval")
def evaluate_robustness(
    model_file: SourceArg,
    folder: Annotated[Optional[Path], typer.Argument(help="an output folder of `fxprune run` (with a Hugging Face "
                                                     "folder first: the pruned folder, measured beside it)",
                                                     show_default=False)] = None,
    attack: Annotated[str, typer.Option("--attack",
                                        help="pgd: L-inf projected gradient descent, random start; none: only the "
                                             "model file's evaluate() (a detector's mAP)")] = "pgd",
    eps: Annotated[float, typer.Option("--eps", help="the L-inf radius, in input units")] = 0.03,
    steps: Annotated[int, typer.Option("--steps", help="attack steps (ANP evaluates with 40)")] = 40,
    step: Annotated[Optional[float], typer.Option("--step", help="step size (default 2.5 eps / steps)",
                                                  show_default=False)] = None,
    batches: Annotated[Optional[int], typer.Option("--batches", help="validation batches to attack (default all)",
                                                   show_default=False)] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="a Hugging Face folder: perplexity and bits per byte "
                                                 "on this text file, run one decoder layer at a time from disk",
                                                 show_default=False)] = None,
    seq_length: Annotated[int, typer.Option("--seq-length", help="--text's tokens per window")] = 256,
    as_json: JsonOpt = False,
) -> None:
    """The model file's evaluate() metrics, clean accuracy, white-box PGD accuracy and mean layer vulnerability of
    the original and the pruned model of an output folder, on the model file's val_loader() (the same code path
    for both). A folder of the modules target (a detector) is rebuilt from the model file and the folder's plan.
    A Hugging Face folder (and optionally its pruned folder) with --text: perplexity on that text."""
    from .robust import evaluate_folder

    if model_file.is_dir() or text is not None:
        from .language import perplexity_command

        with _user_errors():
            rows = perplexity_command(model_file, folder, text, seq_length)
        _print_json(rows) if as_json else _print_perplexity(rows)
        return
    with _user_errors():
        if folder is None:
            from .runconfig import OptionError

            raise OptionError("fxprune eval MODEL_FILE FOLDER: give the output folder to evaluate")
        rows = evaluate_folder(model_file, folder, attack=attack, eps=eps, steps=steps, step=step, batches=batches)
    if as_json:
        _print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    title = f"{folder}: {attack.upper()} eps {eps:g}, {steps} steps" if attack != "none" else f"{folder}"
    table = Table(title=title, title_justify="left")
    metrics = list(rows[0].get("metrics", {}))
    attacked = [c for c in ("clean_accuracy", "pgd_accuracy", "vulnerability") if c in rows[0]]
    for col in ["model", *metrics, *(c.replace("_", " ").replace("pgd", "PGD") for c in attacked)]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(row["model"], *(f"{row['metrics'][m]:.4g}" for m in metrics),
                      *(f"{row[c]:.4f}" if c != "vulnerability" else f"{row[c]:.4g}" for c in attacked))
    Console().print(table)


def _print_perplexity(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console

    from .language import perplexity_table

    Console().print(perplexity_table(rows))


@app.command("export")
def export_format(
    folder: Annotated[Path, typer.Argument(help="an output folder of `fxprune run`", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx: model.onnx and original.onnx, checked with "
                                     "onnxruntime (pip install \"fxprune[onnx]\")")] = "onnx",
    as_json: JsonOpt = False,
) -> None:
    """Write the pruned model of an output folder in a deployment format, checked against model.pt2."""
    from .deploy import FORMATS, DeployError, export_onnx

    with _user_errors():
        if fmt not in FORMATS:
            raise DeployError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        done = export_onnx(folder)
    if as_json:
        _print_json(done)
    else:
        typer.echo(f"wrote {done['path']} (onnxruntime vs model.pt2 on the example inputs: relative error "
                   f"{done['max_rel_err']:.1e}; input shapes {done['input_shapes']})")
        if "original" in done:
            typer.echo(f"wrote {done['original']['path']} (vs original.pt2: relative error "
                       f"{done['original']['max_rel_err']:.1e}), the baseline `fxprune bench` times it against")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``fxprune``) and ``python -m fxprune``."""
    app(args=argv, prog_name="fxprune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
