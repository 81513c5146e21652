"""The ``lora-fast`` command (also ``python -m lora_fast``): inspect, convert, merge, bench.

User errors (missing files, bad formats, a LoRA that does not fit the base model) print one line to stderr and exit
with status 2; ``-v`` adds the traceback and details. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
from typing import Optional

PROG = "lora-fast"


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _user_errors():
    from .errors import LoraError

    return (UsageError, LoraError, OSError)


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _path_size(path: str) -> tuple[int, list[str]]:
    if os.path.isfile(path):
        return os.path.getsize(path), [path]
    total, files = 0, []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            total += os.path.getsize(p)
            files.append(p)
    return total, files


def _read_adapter(path: str, args, component: Optional[str] = None):
    from . import read_lora
    from .errors import LoraFormatError

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    allow_pickle = getattr(args, "allow_pickle", False)
    try:
        return read_lora(path, allow_pickle=allow_pickle, component=component)
    except LoraFormatError as exc:
        # read_lora's advice names its Python keyword; on the command line the switch is --allow-pickle
        if not allow_pickle and "allow_pickle=True" in str(exc):
            raise UsageError(str(exc).replace("pass allow_pickle=True", "pass --allow-pickle")
                             .replace("allow_pickle=True", "--allow-pickle")) from exc
        raise


# --------------------------------------------------------------------------------------------------- inspect


def _histogram(values) -> list[list]:
    counts = collections.Counter(values)
    return [[k, n] for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def inspect_adapter(path: str, args=None) -> dict:
    """Everything ``lora-fast inspect`` reports, as a JSON-able dict."""
    from .adapter import COMPONENTS, split_component
    from .formats.families import adapter_family, kohya_candidates

    adapter = _read_adapter(path, args, getattr(args, "component", None))
    layers = adapter.layers
    size, files = _path_size(path)
    per_comp = collections.Counter(split_component(k)[0] for k in layers)
    unnamed = per_comp.pop(None, 0)
    dtypes = collections.Counter()
    for layer in layers.values():
        for t in (layer.down, layer.up, *layer.lycoris.values()):  # LoRA factors, or LoHa/LoKr/full tensors
            if t is not None:
                dtypes[str(t.dtype).replace("torch.", "")] += 1
    # a factor shared by several modules (the down matrix of a split fused projection) is one tensor: count it once
    tensors = {id(t): t for l in layers.values()
               for t in (l.down, l.up, l.mid, l.magnitude, l.bias, *l.lycoris.values()) if t is not None}
    params = sum(t.numel() for t in tensors.values())
    return {
        "path": os.path.abspath(path),
        "files": [os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f) for f in files],
        "size_bytes": size,
        "format": adapter.format,
        "family": adapter_family(adapter),
        # every family whose kohya name table holds all the modules (SD1.x and SDXL share the LDM/SGM block names)
        "family_candidates": list(kohya_candidates(adapter)),
        "components": {c: per_comp[c] for c in sorted(per_comp, key=lambda c: (
            COMPONENTS.index(c) if c in COMPONENTS else len(COMPONENTS), c))},
        # modules whose keys name no component (a PEFT adapter saved for one model); --component names it
        "modules_without_component": unnamed,
        "modules": len(layers),
        "parameters": params,
        "kinds": dict(collections.Counter(l.kind for l in layers.values())),
        # lora (LoRA/LoCon), loha, lokr, full (LyCORIS): per algorithm, and the algorithm of every module
        "algorithms": dict(collections.Counter(l.algorithm for l in layers.values())),
        "module_algorithms": {k: l.algorithm for k, l in layers.items()},
        "ranks": _histogram(l.rank for l in layers.values()),
        "alphas": _histogram(l.alpha for l in layers.values()),
        "scales": _histogram(round(l.scale, 6) for l in layers.values()),
        "dtypes": dict(dtypes),
        "dora": sum(l.magnitude is not None for l in layers.values()),
        "conv": sum(l.kind == "conv" for l in layers.values()),
        "conv_kxk": sum(l.kind == "conv" and tuple(l.weight_shape[2:]) != (1, 1) for l in layers.values()),
        "tucker": sum(l.mid is not None for l in layers.values()),
        "rslora": sum(l.use_rslora for l in layers.values()),
        "lora_bias": sum(l.bias is not None for l in layers.values()),
        "metadata": dict(adapter.metadata),
    }


def _fmt_hist(hist, unit="modules") -> str:
    if len(hist) == 1:
        return f"{hist[0][0]:g}" if isinstance(hist[0][0], float) else str(hist[0][0])
    parts = [f"{(f'{v:g}' if isinstance(v, float) else v)}: {n}" for v, n in hist]
    return f"varies ({len(hist)} values; {unit} per value) " + ", ".join(parts)


def _fmt_family(info) -> str:
    from .formats.families import FAMILY_NAMES

    family, others = info["family"], [f for f in info["family_candidates"] if f != info["family"]]
    if family is None:
        return "not told by the module names"
    text = FAMILY_NAMES.get(family, family)
    if others:
        text += (" (the default; the names also fit " + ", ".join(FAMILY_NAMES.get(f, f) for f in others)
                 + ": loading into a model of that family uses it)")
    return text


def _cmd_inspect(args) -> int:
    info = inspect_adapter(args.path, args)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    comps = ", ".join(f"{c} ({n})" for c, n in info["components"].items())
    if info["modules_without_component"]:
        folder = os.path.basename(os.path.normpath(info["path"]))
        from .adapter import COMPONENTS

        example = folder if folder in COMPONENTS else "unet"
        unnamed = (f"none named for {info['modules_without_component']} modules (PEFT keys carry no component; "
                   f"--component {example} names it)")
        comps = f"{comps}; {unnamed}" if comps else unnamed
    kinds = ", ".join(f"{k} {n}" for k, n in info["kinds"].items())
    rows = [
        ("path", info["path"]),
        ("size", f"{_human_bytes(info['size_bytes'])} in {len(info['files'])} file(s)"),
        ("format", info["format"] + (f" ({info['family']} layout)" if info["family"]
                                     and info["format"] not in ("diffusers", "peft") else "")),
        ("family", _fmt_family(info)),
        ("components", comps),
        ("modules", f"{info['modules']} ({kinds}); {info['parameters']:,} parameters"),
        ("algorithm", ", ".join(f"{a} {n}" for a, n in info["algorithms"].items())),
        ("rank", _fmt_hist(info["ranks"])),
        ("alpha", _fmt_hist(info["alphas"])),
        ("scale", _fmt_hist(info["scales"])),
        ("dtypes", ", ".join(f"{d} ({n} tensors)" for d, n in info["dtypes"].items())),
        ("DoRA", f"{info['dora']} modules" if info["dora"] else "no"),
        ("conv", (f"{info['conv']} modules ({info['conv_kxk']} k×k, {info['tucker']} Tucker)" if info["conv"] else "no")),
        ("rsLoRA", f"{info['rslora']} modules" if info["rslora"] else "no"),
        ("LoRA bias", f"{info['lora_bias']} modules" if info["lora_bias"] else "no"),
    ]
    if len(info["algorithms"]) > 1 or "lora" not in info["algorithms"]:  # name each non-LoRA module (all with -v)
        named = [(k, a) for k, a in info["module_algorithms"].items() if a != "lora"]
        shown = named if args.verbose else named[:10]
        rows += [(f"  {a}", k) for k, a in shown] + ([("  ...", f"{len(named) - 10} more (-v lists them)")]
                                                       if len(named) > len(shown) else [])
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    md = info["metadata"]
    if md:
        print(f"{'metadata':<{width}}  {len(md)} keys")
        for k in sorted(md):
            v = md[k].replace("\n", " ")
            if len(v) > 100 and not args.verbose:
                v = v[:97] + "..."
            print(f"  {k}: {v}")
    else:
        print(f"{'metadata':<{width}}  none")
    return 0


# --------------------------------------------------------------------------------------------------- convert


def compare_adapters(a, b) -> list[str]:
    """Differences between two adapters' effective weights (delta, DoRA magnitude, scaled bias), module by module."""
    import torch

    problems = []
    for key in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layers.get(key), b.layers.get(key)
        if la is None and lb.magnitude is None and lb.bias is None and not lb.delta().any():
            continue  # a split part the source lacks, re-fused as zero rows (kohya Flux/SD3): the same zero delta
        if la is None or lb is None:
            problems.append(f"{key}: only in {'the source' if lb is None else 'the converted file'}")
            continue
        if la.kind != lb.kind:
            problems.append(f"{key}: kind {la.kind} became {lb.kind}")
            continue
        da, db = la.delta(), lb.delta()
        if da.shape != db.shape:
            problems.append(f"{key}: delta shape {tuple(da.shape)} became {tuple(db.shape)}")
            continue
        if not torch.equal(da, db):
            diff = (da - db).abs().max().item()
            problems.append(f"{key}: delta differs (max abs difference {diff:.3g})")
        for what in ("magnitude", "bias"):
            ta, tb = getattr(la, what), getattr(lb, what)
            if (ta is None) != (tb is None):
                problems.append(f"{key}: {what} {'lost' if tb is None else 'appeared'}")
            elif ta is not None:
                if what == "bias":
                    ta, tb = ta.float() * la.scale, tb.float() * lb.scale
                if ta.shape != tb.shape or not torch.equal(ta.float().reshape(-1), tb.float().reshape(-1)):
                    problems.append(f"{key}: {what} differs")
        if la.magnitude is not None and la.magnitude_axis != lb.magnitude_axis:
            problems.append(f"{key}: DoRA axis {la.magnitude_axis} became {lb.magnitude_axis}")
    return problems


def _cmd_convert(args) -> int:
    src, dst = args.src, args.dst
    if os.path.exists(dst) and not args.overwrite:
        raise UsageError(f"{dst}: already exists; choose another destination or pass --overwrite")
    adapter = _read_adapter(src, args, args.component)
    if getattr(args, "approx_rank", None) is not None:  # LoHa/LoKr/full -> rank-N LoRA, error reported per module
        from .formats.lycoris import approximate_lora

        if args.to == "kohya":
            raise UsageError("--approx-rank is for --to diffusers/peft; kohya keeps LoHa/LoKr/full layers exactly")
        adapter, errors = approximate_lora(adapter, args.approx_rank)
        for key, err in errors.items():
            print(f"approximated {key} at rank {args.approx_rank}: relative error {err:.3g} (Frobenius)")
    if getattr(args, "block_diagonal", False):
        if args.to != "kohya":
            raise UsageError("--block-diagonal is for --to kohya (sd-scripts' fused Flux/SD3 modules)")
        adapter.save(dst, format=args.to, block_diagonal=True)
    else:
        adapter.save(dst, format=args.to)
    comps = adapter.components()
    back_component = None
    if args.to == "peft" and len(comps) == 1 and not os.path.isdir(os.path.join(dst, comps[0])):
        back_component = comps[0]  # a single-component PEFT adapter carries no component in its keys
    readback_path = dst
    if args.to == "diffusers" and os.path.isdir(dst):
        readback_path = os.path.join(dst, "pytorch_lora_weights.safetensors")
    back = _read_adapter(readback_path, argparse.Namespace(allow_pickle=False), back_component)
    problems = compare_adapters(adapter, back)
    n = len(adapter.layers)
    if problems:
        print(f"{PROG}: converted {src} ({adapter.format}) -> {dst} ({args.to}), but {len(problems)} of {n} "
              f"modules do not come back identical:", file=sys.stderr)
        for p in problems[: None if args.verbose else 10]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 10 and not args.verbose:
            print(f"  ... ({len(problems) - 10} more; -v lists them all)", file=sys.stderr)
        return 1
    print(f"converted {src} ({adapter.format}, {n} modules) -> {dst} ({args.to}); re-read and checked: "
          f"every module's delta is identical (bit for bit)")
    return 0


# --------------------------------------------------------------------------------------------------- merge


def _parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (path, weight). A path that exists as given wins (file names may hold colons)."""
    import math

    if os.path.exists(text):
        return text, 1.0
    head, sep, tail = text.rpartition(":")
    if not (sep and head):
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if os.path.exists(head):
            raise UsageError(f"--lora {text}: the weight {tail!r} after the last ':' is not a number "
                             f"(expected FILE:WEIGHT, e.g. {head}:0.8)") from None
        return text, 1.0  # neither FILE nor FILE:WEIGHT: reported as a missing file
    if not math.isfinite(weight):
        raise UsageError(f"--lora {text}: the weight must be a finite number, got {tail!r}")
    return head, weight


def _progress_factory(enabled: bool):
    def make(total: int):
        if not enabled:
            return lambda n: None
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr, leave=False)
        _progress_factory.bars.append(bar)
        return bar.update
    return make


_progress_factory.bars = []


def _cmd_merge(args) -> int:
    from . import checkpoint

    specs = []
    for text in args.lora:
        path, weight = _parse_lora_arg(text)
        adapter = _read_adapter(path, args, None)
        specs.append(checkpoint.LoraSpec(adapter, weight, path))
    dtype = checkpoint.OUTPUT_DTYPES[args.dtype] if args.dtype else None
    show_bar = sys.stderr.isatty() and not args.no_progress
    try:
        result = checkpoint.merge(
            args.base, specs, args.output, dtype=dtype, component=args.component,
            allow_unmatched=args.allow_unmatched, overwrite=args.overwrite,
            progress_factory=_progress_factory(show_bar),
            log=lambda s: print(f"{PROG}: {s}", file=sys.stderr))
    finally:
        for bar in _progress_factory.bars:
            bar.close()
        _progress_factory.bars.clear()
    weights = ", ".join(f"{os.path.basename(s.label)}×{s.weight:g}" for s in specs)
    print(f"merged {result.merged_modules} modules ({weights}) into {result.merged_tensors} tensors; "
          f"wrote {result.files_written} weight file(s) to {result.output}")
    if result.unmatched:
        print(f"{PROG}: warning: {len(result.unmatched)} adapter modules matched nothing in the base and were skipped",
              file=sys.stderr)
        for u in result.unmatched[: None if args.verbose else 10]:
            print(f"  {u}", file=sys.stderr)
        if len(result.unmatched) > 10 and not args.verbose:
            print(f"  ... ({len(result.unmatched) - 10} more; -v lists them all)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------- bench


def _cmd_bench(args) -> int:
    from . import bench

    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UsageError("bench builds diffusers-shaped models: pip install 'lora_fast[diffusers]'") from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here")
    dtypes = []
    for d in args.dtype or ["fp16", "bf16"]:
        for part in d.split(","):
            if part not in bench.DTYPES:
                raise UsageError(f"--dtype {part!r}: expected fp32, fp16 or bf16")
            if part not in dtypes:
                dtypes.append(part)
    formats = []
    for f in args.lora_format or (["diffusers,kohya"] if args.model == "flux" else ["diffusers"]):
        for part in f.split(","):
            if part not in bench.LORA_FORMATS:
                raise UsageError(f"--lora-format {part!r}: expected diffusers or kohya")
            if part not in formats:
                formats.append(part)
    if args.model != "flux" and formats != ["diffusers"]:
        raise UsageError(f"--lora-format kohya: only --model flux writes a kohya file (--model {args.model}: "
                         "diffusers)")
    blocks = None
    if args.flux_blocks is not None:
        if args.model != "flux":
            raise UsageError("--flux-blocks applies to --model flux only")
        try:
            blocks = tuple(int(x) for x in args.flux_blocks.split(","))
        except ValueError:
            blocks = ()
        if len(blocks) != 2 or min(blocks) < 0 or sum(blocks) == 0:
            raise UsageError(f"--flux-blocks {args.flux_blocks!r}: expected DOUBLE,SINGLE block counts, e.g. 2,4 "
                             "(not both 0)")
    cases = [bench.make_case(args.model, targets=args.targets, rank=args.rank, lora_format=f,
                             blocks=blocks if args.model == "flux" else None) for f in formats]
    if not args.verbose:
        _quiet_libraries()
    compare = args.compare == "diffusers"
    log = print if args.verbose else (lambda s: print(s, file=sys.stderr))
    report = bench.run(cases=tuple(cases), dtypes=tuple(dtypes), repeats=args.repeats, warmup=args.warmup,
                       compare_diffusers=compare, size=args.size, device=args.device, log=log, threads=args.threads)
    paths = bench.write_report(report, args.out)
    print()
    print(bench.format_table(report))
    print()
    for p in paths:
        print(f"wrote {p}")
    if not any(p.endswith(".png") for p in paths):
        print(f"{PROG}: no chart: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def _quiet_libraries() -> None:
    """diffusers/transformers log config notes and progress bars while the models are built; not useful here."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers"):
        try:
            logging_mod = __import__(f"{name}.utils.logging", fromlist=["logging"])
            logging_mod.set_verbosity_error()
            logging_mod.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


# --------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show details (and the traceback of an error)")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Inspect, convert, merge and benchmark LoRA adapters for diffusion models (lora_fast).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", parents=[common], help="describe a LoRA file or directory",
                       description="Describe a LoRA: format, components, modules, ranks and alphas (a histogram when "
                                   "they vary), dtypes, DoRA/conv layers, size and metadata.")
    p.add_argument("path", metavar="FILE_OR_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--component", help="component for keys that carry none (PEFT files), e.g. unet")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (unpickling runs code)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", parents=[common], help="convert a LoRA to another format, checked exact",
                       description="Convert a LoRA between formats. The result is re-read and every module's delta "
                                   "compared with the source's, bit for bit; exit status 1 if any differs.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="a .safetensors file (diffusers, kohya) or a directory (peft)")
    p.add_argument("--to", required=True, choices=["diffusers", "kohya", "peft"])
    p.add_argument("--approx-rank", type=int, default=None, metavar="N",
                   help="LyCORIS LoHa/LoKr/full modules to diffusers/peft: replace each by its best rank-N LoRA "
                        "(truncated SVD) and print each module's relative error; without it they are refused")
    p.add_argument("--block-diagonal", action="store_true",
                   help="--to kohya, Flux/SD3: split modules of one fused projection (to_q/to_k/to_v...) that do not "
                        "share their down matrix are written as one exact block-diagonal module (rank the sum of "
                        "theirs); without it they are refused")
    p.add_argument("--component", help="component for keys that carry none (PEFT files), e.g. unet")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (unpickling runs code)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("merge", parents=[common], help="bake LoRAs into a base checkpoint, streaming",
                       description="Bake one or more LoRAs into a diffusers-named base checkpoint: a .safetensors "
                                   "file, a sharded checkpoint (*.safetensors.index.json), a model folder or a "
                                   "pipeline folder. Tensors are streamed one at a time (memory ~ the largest tensor "
                                   "plus the adapters); the output is written atomically, with the same sharding "
                                   "and metadata.")
    p.add_argument("--base", required=True, metavar="MODEL", help="base checkpoint (file, index, or folder)")
    p.add_argument("--lora", required=True, action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA and its strength (default 1.0); repeat for several")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: a file for a single-file base, a directory otherwise")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="convert floating-point tensors to this dtype (default: keep each tensor's dtype)")
    p.add_argument("--component", help="which adapter component the base is (unet, text_encoder, ...), when it "
                                       "cannot be told from the folder name or config")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="merge even if some adapter modules match nothing in the base (they are listed)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt LoRA files (unpickling runs code)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("bench", parents=[common], help="fuse/unfuse benchmark vs diffusers and the machine floor",
                       description="Fuse and unfuse a random LoRA on a built-in full-size model (random weights) with "
                                   "lora_fast and diffusers, next to the machine's measured floor (memory bandwidth / "
                                   "matmul rate). Prints a table and writes bench.json and bench.png to --out.")
    p.add_argument("--model", choices=["sd15", "sdxl", "sd3", "flux"], default="sd15",
                   help="built-in model shape (default sd15: UNet + CLIP text encoder; flux: the Flux.1-dev "
                        "transformer's width with fewer blocks, see --flux-blocks)")
    p.add_argument("--targets", choices=["attn", "linear"], default=None,
                   help="attention projections, or every Linear (default: attn for sd15/sd3, linear for sdxl and "
                        "flux; flux: of the double/single blocks)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 4 sd15, 32 sdxl, 16 sd3 and flux)")
    p.add_argument("--flux-blocks", default=None, metavar="DOUBLE,SINGLE",
                   help="--model flux: double and single transformer blocks (default 2,4; Flux.1-dev has 19,38); "
                        "the output says what fraction of the real transformer that is")
    p.add_argument("--lora-format", action="append", metavar="FORMAT",
                   help="layout of the LoRA file both libraries load: diffusers (diffusers/PEFT names) or kohya "
                        "(sd-scripts, flux only: fused qkv/linear1 modules); repeat or comma-separate (default: "
                        "diffusers,kohya for flux, diffusers otherwise)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, fp16, bf16; repeat or comma-separate (default fp16,bf16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compare", choices=["diffusers", "none"], default="diffusers",
                   help="also time diffusers' fuse_lora/unfuse_lora (default diffusers)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="timed warm fuse/unfuse cycles per library, median reported (default 11: the median stays an "
                        "undisturbed cycle unless 6 or more of them are disturbed)")
    p.add_argument("--warmup", type=int, default=None, metavar="W",
                   help="untimed cycles between the first call after loading (reported on its own) and the timed "
                        "ones (default 2)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for both libraries (default: torch's default, one per core). On a busy machine "
                        "--threads 1 gives ratios that contention distorts much less")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where bench.json and bench.png go")
    p.add_argument("--size", choices=["full", "tiny"], default="full", help=argparse.SUPPRESS)  # tests
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the earlier name of `bench`
        argv[0] = "bench"
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    if getattr(args, "command", None) == "bench":
        from . import bench

        if args.rank is not None and args.rank < 1:
            parser.error("--rank must be >= 1")
        args.repeats = bench.REPEATS if args.repeats is None else args.repeats
        args.warmup = bench.WARMUP if args.warmup is None else args.warmup
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        if args.warmup < 0:
            parser.error("--warmup must be >= 0")
        if args.threads is not None and args.threads < 1:
            parser.error("--threads must be >= 1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lora-fast inspect x | head`: stop quietly, like other command-line tools
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except _user_errors() as exc:
        if args.verbose:
            traceback.print_exc()
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
            msg = f"{exc.filename}: {exc.strerror or msg}"
        print(f"{PROG}: error: {msg.splitlines()[0] if not args.verbose else msg}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not a user error: still one line unless -v
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
