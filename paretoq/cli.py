"""`paretoq` subcommands: argument parsing only; each subcommand calls one library function.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem and the fix), 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from paretoq.errors import ParetoqError
from paretoq.export.targets import TARGETS
from paretoq.quant import BITS
from paretoq.quant.settings import FLAGS, GGML_TYPES, GRIDS, METHODS, MIN_DAMP, QuantSettings, check, settings_for
from paretoq.storage import HEARTBEAT_SECONDS


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (option, value, what is accepted) and no usage block."""

    def error(self, message: str):
        self.exit(2, f"paretoq: error: {message}; see `{self.prog} --help`\n")


def _number(text: str, accepted: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass {accepted}") from None


def bits_budget(text: str) -> float:
    """A budget in average bits per weight: a finite number between the smallest and largest width."""
    value = _number(text, f"a number between {min(BITS)} and {max(BITS)}")
    if not (math.isfinite(value) and min(BITS) <= value <= max(BITS)):
        raise argparse.ArgumentTypeError(f"budget {text} is outside the bit choices; pass a number between "
                                         f"{min(BITS)} and {max(BITS)}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "a positive number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds; pass one, e.g. 600")
    return value


def integer(lo: int | None = None, hi: int | None = None):
    """A converter for integers in [lo, hi], whose error names the accepted range."""
    accepted = (f"an integer from {lo} to {hi}" if hi is not None else f"an integer of at least {lo}"
                if lo is not None else "an integer")

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass {accepted}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range; pass {accepted}")
        return value

    return convert


ALL_WIDTHS = tuple(sorted(set(BITS) | set(GGML_TYPES)))  # GPTQ's, and ggml's (5 and 6: q5_k, q6_k)


def _width_in(widths: tuple[int, ...]):
    def convert(text: str) -> int:
        if not text.strip().isdigit() or int(text) not in widths:
            raise argparse.ArgumentTypeError(f"{text!r} is not a bit width paretoq quantizes to; pass one of "
                                             f"{', '.join(map(str, widths))}")
        return int(text)

    return convert


bit_width = _width_in(BITS)  # paretoq's own checkpoints: GPTQ's widths
any_width = _width_in(ALL_WIDTHS)  # eval: GPTQ's or ggml's (checked against --quantizer later)


def bit_list(text: str) -> tuple[int, ...]:
    """``--bits 2,3,4``: a comma-separated subset of the widths."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names no width; pass a comma-separated subset of "
                                         f"{','.join(map(str, ALL_WIDTHS))}, e.g. 2,3,4")
    widths = []
    for p in parts:
        if not p.lstrip("-").isdigit() or int(p) not in ALL_WIDTHS:
            raise argparse.ArgumentTypeError(f"{p!r} is not a supported width; pass a comma-separated subset of "
                                             f"{','.join(map(str, ALL_WIDTHS))}, e.g. 2,3,4")
        widths.append(int(p))
    return tuple(sorted(set(widths)))


def device(text: str) -> str:
    """cpu, cuda or cuda:N (and auto where a command offers it); cuda only where torch sees a GPU."""
    if text in ("auto", "cpu"):
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for but torch sees no CUDA device; pass --device cpu")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA devices; "
                                             f"pass cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; pass cpu or cuda (cuda:N for one GPU)")


def _setting(name: str, value, message: str):
    """``value`` if the quantizer setting ``name`` accepts it (``paretoq.quant.settings.check``, the
    rule plans are held to), else argparse's one-line ``message``."""
    try:
        return check(name, value)
    except ParetoqError:
        raise argparse.ArgumentTypeError(message) from None


def group_size(text: str) -> int:
    value = integer()(text)
    return _setting("group_size", value, f"{value} is not a group size; pass a positive integer (e.g. 128) or -1 "
                                         f"(per channel)")


def damp(text: str) -> float:
    accepted = f"a number from {MIN_DAMP:g} to 1, e.g. {QuantSettings.damp}"
    return _setting("damp", _number(text, accepted), f"{text!r} is out of range; pass {accepted}")


def port(text: str) -> int:
    """1 to 65535, or 0: any free port (the operating system picks one)."""
    return 0 if text.strip() == "0" else integer(1, 65535)(text)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="local Hugging Face model directory, or 'demo' (default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model directory's own code to run")


def cmd_info(args: argparse.Namespace) -> int:
    from paretoq.models import load_model
    from paretoq.models.summary import format_info, model_info

    # Shapes come from the config alone (meta device): instant even for a 100B-parameter model.
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, weights=False)
    info = model_info(loaded, budget=args.budget)
    if args.json:
        print(json.dumps(info.to_dict(), indent=1))
        return 0
    print(format_info(info))
    if args.components:
        print()
        print(f"{'key':60s} {'kind':7s} {'shape':>12s} {'params':>10s}")
        for c in [*info.components, *info.outer]:
            print(f"{c.key:60s} {c.kind:7s} {'x'.join(map(str, c.shape)):>12s} {c.params:10,d}")
        if info.outer:
            print(f"({', '.join(c.kind for c in info.outer)}: planned only with --target llamacpp, whose GGUF "
                  "stores them quantized)")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from paretoq.probes.run import format_summary, probe

    result = probe(
        model=args.model, calib=args.calib, out=args.out, calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
        device=args.device, max_memory=args.max_memory, use_cache=not args.no_cache,
        trust_remote_code=args.trust_remote_code, progress=not args.quiet,
    )
    print(format_summary(result))
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from paretoq.export.imatrix import imatrix

    path, im = imatrix(model=args.model, out=args.out, calib=args.calib, calib_tokens=args.calib_tokens,
                       eval_tokens=args.eval_tokens, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
                       device=args.device, max_memory=args.max_memory, trust_remote_code=args.trust_remote_code,
                       progress=not args.quiet)
    print(f"wrote {path}: {len(im.sums)} tensors, {im.chunk_count} windows of {im.chunk_size} tokens")
    print(f"next: llama-quantize --imatrix {path} ... (or paretoq export --format llamacpp --imatrix {path})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from paretoq.quant.sequential import quantize

    r = quantize(
        plan=args.plan, out=args.out, model=args.model, uniform=args.uniform, calib=args.calib,
        calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len, seed=args.seed,
        device=args.device, dtype=args.dtype, max_memory=args.max_memory, trust_remote_code=args.trust_remote_code,
        quant=quant_flags(args), progress=not args.quiet,
    )
    print(f"wrote {r.out}: {len(r.plan.bits)} components at {r.avg_bits:.3f} average bits, "
          f"{r.size_bytes / 1e6:.2f} MB of codes, scales and zeros ({r.seconds:.1f} s)")
    if r.rtn_fallback:
        print(f"{len(r.rtn_fallback)} components saw no calibration token and were rounded to nearest: "
              f"{', '.join(r.rtn_fallback[:5])}{' ...' if len(r.rtn_fallback) > 5 else ''}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from paretoq.eval_plans import eval_plans, format_report

    report = eval_plans(
        plans=args.plan or [], uniform=args.uniform or [], gguf=args.gguf or [], model=args.model, calib=args.calib,
        calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len, seed=args.seed,
        lm_eval=[t for t in (args.lm_eval or "").split(",") if t], lm_eval_limit=args.lm_eval_limit,
        device=args.device, dtype=args.dtype, max_memory=args.max_memory, use_cache=not args.no_cache,
        trust_remote_code=args.trust_remote_code, quant=quant_flags(args), progress=not (args.json or args.quiet),
        gguf_activations=args.gguf_activations,
    )
    if args.json:
        rows = [p.to_dict() for p in report.plans]
        if report.fp_lm_eval:
            for r in rows:
                r["lm_eval_fp"] = report.fp_lm_eval
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1))
    else:
        print(format_report(report))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    settings_for(quant_flags(args), TARGETS.get(args.target))  # a flag the target cannot run: before any import
    from paretoq.search import SearchConfig, run_search

    bits = args.bits
    state = run_search(SearchConfig(
        budget=args.budget, model=args.model, calib=args.calib, space=args.space, bits=bits, trials=args.trials,
        timeout=args.timeout, seed=args.seed, study=args.study, storage=args.storage,
        out=Path(args.out) if args.out else None, mode=args.mode, calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens, seq_len=args.seq_len, jobs=args.jobs, device=args.device,
        dtype=args.dtype, max_memory=args.max_memory, use_cache=not args.no_cache,
        trust_remote_code=args.trust_remote_code, heartbeat=args.heartbeat, worker=args.worker,
        progress=not (args.worker or args.quiet), target=args.target, sensitivity=args.sensitivity,
        quant=quant_flags(args),
    ))
    if args.worker:
        return 130 if state.interrupted else 0
    from paretoq.report import completed

    done = completed(state.study)
    if state.interrupted:
        print(f"paretoq: interrupted after {len(done)} of {args.trials} verified trials; the study keeps them and "
              f"the outputs in {state.out} cover them; run the same command again to resume", file=sys.stderr)
    elif done and all(str(t.user_attrs.get("source", "")).startswith("baseline:") for t in done):
        # --trials counts the baselines (docs/cli.md): say so when they took every trial.
        queued = {t.user_attrs["source"] for t in state.study.get_trials(deepcopy=False)
                  if str(t.user_attrs.get("source", "")).startswith("baseline:")}
        unverified = len(queued) - len(done)
        left = f" ({unverified} seed heuristics not verified; the knapsack, queued first, was)" if unverified > 0 else ""
        print(f"paretoq: note: the {len(queued)} baselines take the first {len(queued)} trials and --trials "
              f"{args.trials} ended the study after {len(done)} of them{left}, so the search proper did not run; "
              f"pass --trials above {len(queued)} (e.g. {len(queued) + 40})", file=sys.stderr)
    if state.plan is not None:
        m = state.plan.metrics
        test = f", held-out KL {m['kl_test']:.4g}" if m.get("kl_test") is not None else ""
        print(f"best plan within {args.budget:g} bits: KL {m['kl']:.4g}{test}, perplexity {m['ppl']:.3f} "
              f"(fp {m['ppl_fp']:.3f}), trial {m['trial']} ({m['source']})")
        print(f"wrote {state.out}/plan.json, front.json, front.png, report.md")
    else:
        print(f"no verified plan within {args.budget:g} bits yet, so no plan.json; run more --trials")
        print(f"wrote {state.out}/front.json, front.png, report.md")
    print(f"inspect: paretoq dashboard --study {state.study.study_name}")
    return 130 if state.interrupted else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from paretoq.runtime.generate import generate

    g = generate(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device,
                 dtype=args.dtype, backend=args.backend)
    print(args.prompt + g.text)
    print(f"{len(g.new_tokens)} new tokens in {g.seconds:.3f} s: {g.tokens_per_s:.1f} tokens/s "
          f"(greedy, {g.backend} backend on {g.device}, prompt {g.prompt_tokens} tokens)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from paretoq.kernels.bench import run_bench

    print(run_bench(shapes=args.shapes, checkpoint=args.checkpoint, ms=args.m, tune=args.tune,
                    out=Path(args.out) if args.out else None))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from paretoq.export import export

    r = export(plan=args.plan, format=args.format, out=args.out, model=args.model, collapse_mode=args.collapse,
               ggml_types=args.ggml_types, imatrix=args.imatrix, trust_remote_code=args.trust_remote_code)
    if r.collapsed is not None:
        print(r.collapsed.summary())
    print(f"wrote {', '.join(str(f) for f in r.files)}")
    for note in r.notes:
        print(f"note: {note}")
    print("next:")
    for line in r.next.splitlines():
        print(f"  {line}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from paretoq.dashboard import no_auth_warning, open_dashboard

    dash = open_dashboard(study=args.study, storage=args.storage, host=args.host, port=args.port)
    warning = no_auth_warning(args.host)
    if warning:
        print(f"paretoq: {warning}", file=sys.stderr)
    print(f"study {dash.target.study!r} at {dash.url}", flush=True)
    print(f"the same by hand: {dash.command}", flush=True)
    print("Ctrl-C stops it", flush=True)
    dash.serve_forever()
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from paretoq.zoo.train import TrainConfig, train_demo

    cfg = replace(TrainConfig(), seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    stats = train_demo(Path(args.out), cfg)
    print(
        f"wrote {args.out}: held-out perplexity {stats['heldout_ppl']:.2f} (unigram baseline "
        f"{stats['unigram_ppl']:.1f}), expert usage max/min per MoE layer "
        f"{', '.join(f'{r:.2f}' for r in stats['usage_max_min_ratio'])}, {stats['seconds']:.0f} s"
    )
    return 0


def _add_data(p: argparse.ArgumentParser, cache: bool = True) -> None:
    from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN

    p.add_argument("--calib", default="demo",
                   help="calibration text: a .txt file, a .jsonl file with a 'text' field, or 'demo' (default)")
    p.add_argument("--calib-tokens", type=integer(1), default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--eval-tokens", type=integer(1), default=DEFAULT_EVAL_TOKENS,
                   help=f"evaluation tokens kept out of calibration (default {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--seq-len", type=integer(1), default=DEFAULT_SEQ_LEN, help=f"window length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--seed", type=integer(0), default=0, help="seed for the windows and every random choice (default 0)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (default: the checkpoint's own; float32 for the demo), bfloat16, "
                        "float16 or float32")
    p.add_argument("--device", default="cpu", type=device, help="cpu (default) or cuda")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the model's weights may hold on the device, e.g. 24GB: a model that fits is kept "
                        "there once read, a larger one is streamed layer by layer; 0 always streams "
                        "(default: half of what is available)")
    if cache:
        p.add_argument("--no-cache", action="store_true",
                       help="recompute every cache entry (capture, quant cache, reference) and overwrite it")


def _add_quant(p: argparse.ArgumentParser) -> None:
    """The quantizer's settings; unset ones come from --target's engine, then the plan, then the defaults."""
    d = QuantSettings()
    p.add_argument("--group-size", type=group_size, help=f"columns per quantization group, or -1 per channel "
                   f"(default {d.group_size})")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, default=None,
                     help="symmetric grid (zero point fixed at the middle)")
    sym.add_argument("--asym", dest="sym", action="store_const", const=False,
                     help="asymmetric grid, a zero point per group (default)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ in order of decreasing Hessian diagonal (desc_act; default off)")
    p.add_argument("--damp", type=damp, help=f"GPTQ's damping, a fraction of the mean Hessian diagonal "
                   f"(default {d.damp})")
    p.add_argument("--grid", choices=GRIDS, help=f"each group's grid: a shrink search on GPTQ's loss, or min-max "
                   f"as the reference GPTQ and most engines' quantizers (default {d.grid})")


def quant_flags(args: argparse.Namespace) -> dict:
    """The quantizer settings the user gave (QuantSettings field -> value), for ``settings_for``."""
    return {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}


# Code that an exception raised from a signal handler may leave half done with a database lock held
# (a pooled SQLite connection that never rolled back keeps the write lock, and the failed trial's own
# record then waits for it and fails "database is locked"): an interrupt waits until the call is out.
_DATABASE_MODULES = ("sqlalchemy.", "optuna.storages.", "sqlite3.", "psycopg2.")


def _in_database_call(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_DATABASE_MODULES):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame):
    """Ctrl-C and SIGTERM: raise KeyboardInterrupt, but never inside a database call (a few
    milliseconds): there, send the signal again a moment later."""
    if _in_database_call(frame):
        threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


# What an interrupted command leaves, and how to go on (a search interrupted in its trials says it itself).
INTERRUPTED = {
    "search": "the finished setup steps are cached and the study keeps its verified trials; run the same command "
              "again to resume",
    "probe": "the finished steps are cached and no output was written; run the same command again to resume",
    "eval": "the finished steps are cached and nothing was written; run the same command again to resume",
    "quantize": "no checkpoint was written (it appears whole or not at all); run the same command again",
}


def _quiet_interrupts() -> None:
    """Optuna logs a trial ended by Ctrl-C or SIGTERM with its traceback; paretoq says it in one line."""
    import logging

    interrupted = []

    def keep(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt) or "KeyboardInterrupt" in record.getMessage():
            interrupted.append(record)
            return False
        # Optuna follows it with "Trial N failed with value None.": the same interrupt again.
        return not (interrupted and "failed with value None" in record.getMessage())

    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(keep)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="paretoq",
        description="Pareto-optimal mixed-precision (2/3/4/8-bit) quantization plans for Mixture-of-Experts models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="the model's architecture, components, and what a budget means for it")
    _add_model(p)
    p.add_argument("--budget", type=bits_budget, default=3.0, help="average bits per weight to explain (default 3.0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--components", action="store_true", help="also list every component")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("probe", help="sensitivity probes: usage, outlier score, significance, block cosine score")
    _add_model(p)
    _add_data(p)
    p.add_argument("--out", default="probes", help="directory for features.json, features.csv, probes.png")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("imatrix", help="llama.cpp's importance matrix (GGUF) from paretoq's calibration tokens")
    _add_model(p)
    _add_data(p, cache=False)
    p.add_argument("--out", default="imatrix.gguf", help="the file to write (default imatrix.gguf)")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("quantize", help="sequential GPTQ under a plan, saved as a packed checkpoint")
    _add_model(p)
    p.add_argument("--plan", help="plan.json (from `paretoq search`, or written by hand)")
    p.add_argument("--uniform", type=bit_width, help="instead of a plan: every component at this many bits (2, 3, 4 or 8)")
    p.add_argument("--out", required=True, help="new directory for the checkpoint")
    _add_quant(p)
    _add_data(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="KL, perplexity and agreement of plans against the full-precision model")
    _add_model(p)
    p.add_argument("--plan", nargs="+", help="one or more plan.json files")
    p.add_argument("--uniform", type=any_width, nargs="+", help="also evaluate every component at these widths")
    p.add_argument("--gguf", nargs="+", metavar="FILE",
                   help="also evaluate GGUF files converted from --model (llama.cpp's or anyone's), dequantized "
                        "with gguf's own code")
    p.add_argument("--gguf-activations", choices=("ggml", "exact"), default="ggml",
                   help="ggml (default): round each quantized product's input to 8 bits per block as llama.cpp "
                        "does (q8_K for K-quants, q8_0 for legacy types), so a GGUF is scored as llama.cpp computes "
                        "it; exact: the dequantized weights with float activations")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="comma-separated lm-eval tasks run in-process and offline; 'demo' = the demo's two local tasks")
    p.add_argument("--lm-eval-limit", type=integer(1), help="evaluate only the first N documents of each task")
    p.add_argument("--json", action="store_true", help="print JSON (one object for one plan, else a list)")
    _add_quant(p)
    p.add_argument("--quantizer", dest="method", choices=METHODS,
                   help="gptq: paretoq's GPTQ at 2/3/4/8 bits; ggml: llama.cpp's own quantizers "
                        f"({', '.join(f'{b}={t}' for b, t in GGML_TYPES.items())}) with the calibration's importance "
                        "matrix, bits in their real bits per weight, which is what llama-quantize makes of the plan "
                        "(needs the 'llamacpp' extra; default: the plan's own, else gptq)")
    _add_data(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="search per-component bit widths under a budget")
    _add_model(p)
    p.add_argument("--budget", type=bits_budget, default=3.0, help="ceiling on average bits per weight (default 3.0)")
    p.add_argument("--trials", type=integer(1), default=100,
                   help="verified plans in the study, baselines included (default 100; see docs/cli.md)")
    p.add_argument("--timeout", type=positive_float, help="stop after this many seconds")
    p.add_argument("--space", default="default", help="search space: a bundled name (default, component, "
                   "layer-experts, layer-projection) or a YAML file")
    p.add_argument("--bits", type=bit_list, help="restrict the bit choices, e.g. 2,3,4")
    p.add_argument("--study", help="study name (default: <model>-<budget>bit)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/paretoq.db)")
    p.add_argument("--out", help="output directory (default: studies/<study>)")
    p.add_argument("--mode", default="surrogate", choices=["surrogate", "local", "nsga2", "random"],
                   help="surrogate-assisted search (default), local exchanges ranked by the sensitivities alone, "
                        "plain NSGA-II, or random search")
    p.add_argument("--sensitivity", default="auto", choices=["auto", "unit", "lowest", "group"],
                   help="measured sensitivity: 'lowest' (each group alone at its lowest width, scaled to the others "
                        "by GPTQ error: groups evaluations), 'unit' (per layer and kind, shared by GPTQ error: cost "
                        "independent of the group count), 'group' (each group alone at each width); 'auto' (default): "
                        "lowest when it costs no more evaluations than --trials, else unit")
    p.add_argument("--jobs", type=integer(1), default=1,
                   help="worker processes on this machine, all verifying trials of one study (default 1)")
    p.add_argument("--heartbeat", type=integer(1), default=HEARTBEAT_SECONDS, metavar="SECONDS",
                   help=f"a running trial whose worker is silent for 3 heartbeats is failed and retried "
                        f"(default {HEARTBEAT_SECONDS})")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --jobs
    p.add_argument("--target", choices=list(TARGETS),
                   help="propose only plans this engine can load and measure them with its quantizer's "
                        "settings (ties groups, restricts bits, e.g. vllm: symmetric 4/8 bits)")
    _add_quant(p)
    _add_data(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("generate", help="greedy text generation with a quantized checkpoint, tokens/s printed")
    p.add_argument("--checkpoint", required=True, help="directory written by `paretoq quantize`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=integer(1), default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", default="auto", type=device, help="auto (cuda when present, default), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto (float16 on cuda, float32 on cpu), float16, bfloat16 or float32")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="auto (Triton kernels on cuda, the torch path elsewhere, default), triton or torch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="Triton kernel micro-benchmarks and decode tokens/s against cuBLAS and torch int4")
    p.add_argument("--shapes", default="mixtral", choices=["mixtral", "qwen-moe", "deepseek"],
                   help="expert shapes to time (default mixtral: 4096x14336 and 14336x4096)")
    p.add_argument("--checkpoint", help="also time end-to-end decode of this `paretoq quantize` checkpoint vs its fp16 model")
    p.add_argument("--m", default="1,4,16,64,256", help="token counts M to time (default 1,4,16,64,256)")
    p.add_argument("--tune", action="store_true", help="search launch configs on this GPU and save them for later runs")
    p.add_argument("--out", help="also write the raw results as JSON to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a plan for GPTQModel, vLLM, llm-compressor, llama.cpp or exllamav3")
    p.add_argument("--plan", required=True, help="plan.json (from `paretoq search`, or written by hand)")
    p.add_argument("--format", required=True, choices=list(TARGETS),
                   help="; ".join(f"{t.name}: {t.help}" for t in TARGETS.values()))
    p.add_argument("--out", help="output directory (default: export-<format> beside the plan)")
    p.add_argument("--model", help="the model the plan is for (default: the plan's own \"model\")")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model directory's own code to run")
    p.add_argument("--collapse", choices=["max", "weighted"],
                   help="coarsen a plan finer than the target serves: widest width per engine module, or the "
                        "served width nearest the weighted mean")
    p.add_argument("--ggml-types", help="llamacpp: ggml type per width, e.g. 2=iq2_xs,3=q3_k,fp=bf16 "
                   "(default 2=q2_k,3=q3_k,4=q4_k,8=q8_0,fp=f16)")
    p.add_argument("--imatrix", metavar="FILE",
                   help="llamacpp: an importance matrix of this model (from `paretoq imatrix` or llama-imatrix), "
                        "checked and copied into the export; llama-quantize's command then uses it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dashboard", help="serve a study in optuna-dashboard: the front, baselines, plans and figures")
    p.add_argument("--study", help="study name (default: the one `paretoq search` used last in this directory)")
    p.add_argument("--storage", help="Optuna storage URL (default: the one `paretoq search` used last here)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; the dashboard has no authentication)")
    p.add_argument("--port", type=port, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("zoo", help="the bundled demo model")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    t = zoo.add_parser("train", help="reproduce the demo MoE (seeded; ~25 minutes on 2 CPU cores)")
    t.add_argument("--out", required=True, help="new directory to write the model into")
    t.add_argument("--seed", type=integer(0), default=0)
    t.add_argument("--steps", type=integer(1), default=None, help="optimizer steps (default: the shipped model's)")
    t.set_defaults(func=cmd_zoo_train)
    for name, p in sub.choices.items():
        if name != "zoo":
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Never reach for the hub: every model and tokenizer is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM (a scheduler, `kill`, a container stop) ends a command as Ctrl-C does: cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "search":
        import optuna  # noqa: F401  (importing it installs the handler that _quiet_interrupts filters)

        _quiet_interrupts()
    try:
        return args.func(args)
    except ParetoqError as exc:
        print(f"paretoq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not getattr(args, "worker", False):
            what = INTERRUPTED.get(args.command, "nothing was written; run the same command again")
            print(f"paretoq: interrupted; {what}", file=sys.stderr)
        return 130
    except Exception:  # an internal failure: show everything
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
