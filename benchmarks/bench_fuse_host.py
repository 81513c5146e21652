"""Host-side cost of the Triton fuse/unfuse path against the layer count, on the CPU (issue 17).

What a GPU fuse costs the host (building the launch, torch operations, kernel launches, host reads of device values)
does not depend on the kernel, so it is measured here without one: the engine's ``fuse_lora`` / ``unfuse_lora`` run
the Triton launcher on CPU tensors with the kernel replaced by a stand-in that does nothing (the counting pass
reports no record). "fuse" is a first fuse (the fuse cache off), "repeat fuse" a fuse of the same adapter at the
same scale after an exact unfuse (at the cached record positions), "safe fuse" a repeated ``safe_fusing`` fuse
(counting pass and one host read on the cached table). ``n`` Linear(64, 64) fp16 layers, one rank-4 fp16 adapter. Per size: median wall time of the
call (after warm-up), torch operations (a TorchDispatchMode counter), kernel launches and host reads (the
launcher's counters; each is one synchronization on a GPU). ``--old REV`` runs the same on an older lora_fast
(extracted from git into a temporary directory, with this tree's compiled ``_C``) for a before/after.

    python benchmarks/bench_fuse_host.py [--layers 8 64 256 722] [--repeat 9] [--old 6d7d680]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

WORKER = textwrap.dedent(
    """
    import json, os, statistics, sys, time
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    import lora_fast
    from lora_fast import LoraAdapter, LoraLayer
    from lora_fast.kernels import merge as M, probe as P

    layers_list, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)

    class Count(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    launches = [0]
    class Stub:  # stands in for the Triton kernel: no work, no record
        def __getitem__(self, grid):
            def run(*args, **kw):
                launches[0] += 1
                if kw.get("MODE") == 1 or "counters" in kw or (len(args) > 3 and kw.get("RECORD")):
                    pass
                if kw.get("MODE") == 1:
                    args[2].zero_()
                if kw.get("MODE") == 2 and getattr(M, "FuseCache", None) is not None:
                    args[7].zero_()  # the skip array: no tile skipped
            return run
    M._triton_kernel = lambda: Stub()
    M._DEFAULT["cpu"] = "triton"
    P._cache[P._key("merge", "cpu", torch.float16)] = P._Verdict(None)  # no probe: the stand-in is not the kernel
    syncs = [0]
    _tolist = torch.Tensor.tolist
    def tolist(self):
        syncs[0] += 1
        return _tolist(self)
    torch.Tensor.tolist = tolist  # host reads, counted the same way on the old launcher (which used .tolist())

    out = {}
    for n in layers_list:
        torch.manual_seed(0)
        m = nn.ModuleDict({f"l{i}": nn.Linear(64, 64) for i in range(n)}).half()
        g = torch.Generator().manual_seed(1)
        ad = {f"l{i}": LoraLayer(down=(torch.randn(4, 64, generator=g) * 0.1).half(),
                                 up=(torch.randn(64, 4, generator=g) * 0.1).half(), alpha=4.0, kind="linear")
              for i in range(n)}
        lora_fast.load_lora_weights(m, LoraAdapter(ad, "diffusers"), adapter_name="a")
        res = {}
        for what, call in (("fuse", lambda: lora_fast.fuse_lora(m)),
                           ("unfuse", lambda: lora_fast.unfuse_lora(m)),
                           ("safe fuse", lambda: lora_fast.fuse_lora(m, safe_fusing=True)),
                           ("unfuse ", lambda: lora_fast.unfuse_lora(m))):
            res.setdefault(what.strip(), {})
        def cycle(which, counted):
            c = Count()
            l0, s0 = launches[0], syncs[0]
            t0 = time.perf_counter()
            if counted:
                with c:
                    which()
            else:
                which()
            return time.perf_counter() - t0, c.n, launches[0] - l0, syncs[0] - s0
        def first(**kw):  # a fuse that cannot repeat a cached one (the cache is off)
            os.environ["LORA_FAST_FUSE_CACHE"] = "0"
            try:
                lora_fast.fuse_lora(m, **kw)
            finally:
                os.environ.pop("LORA_FAST_FUSE_CACHE")
        calls = {"fuse": first, "repeat fuse": lambda: lora_fast.fuse_lora(m),
                 "safe fuse": lambda: lora_fast.fuse_lora(m, safe_fusing=True)}
        for name, fuse_call in calls.items():
            for _ in range(2):  # warm-up (and, for the repeats, the fuse they repeat)
                fuse_call(); lora_fast.unfuse_lora(m)
            tf, tu = [], []
            for _ in range(repeat):
                tf.append(cycle(fuse_call, False)[0])
                tu.append(cycle(lambda: lora_fast.unfuse_lora(m), False)[0])
            _, ops_f, la_f, sy_f = cycle(fuse_call, True)
            _, ops_u, la_u, sy_u = cycle(lambda: lora_fast.unfuse_lora(m), True)
            res[name] = {"ms": statistics.median(tf) * 1e3, "ops": ops_f, "launches": la_f, "syncs": sy_f}
            if name == "fuse":
                res["unfuse"] = {"ms": statistics.median(tu) * 1e3, "ops": ops_u, "launches": la_u, "syncs": sy_u}
        out[n] = res
    print("RESULT " + json.dumps(out))
    """
)


def run(pythonpath: str, layers, repeat) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(layers), str(repeat)], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(line[-1][7:])


def old_tree(rev: str, root: str) -> str:
    d = tempfile.mkdtemp(prefix="lf_old_")
    arch = subprocess.run(["git", "-C", root, "archive", rev, "lora_fast"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    for f in os.listdir(os.path.join(root, "lora_fast")):
        if f.startswith("_C") and f.endswith(".so"):
            shutil.copy(os.path.join(root, "lora_fast", f), os.path.join(d, "lora_fast", f))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 64, 256, 722])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--old", default=None, help="git revision to compare with")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"commit {rev.strip()}, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    runs = [("this tree", root)]
    if args.old:
        runs.append((f"old {args.old}", old_tree(args.old, root)))
    for label, path in runs:
        res = run(path, args.layers, args.repeat)
        print(f"\n{label}")
        what = [w for w in ("fuse", "repeat fuse", "unfuse", "safe fuse") if w in res[str(args.layers[0])]]
        print(f"{'layers':>7} | " + " | ".join(f"{w:>34}" for w in what))
        print(f"{'':>7} | " + " | ".join(f"{'ms':>8} {'ops':>7} {'launch':>7} {'sync':>6}" for _ in what))
        for n in args.layers:
            r = res[str(n)]
            cells = []
            for w in what:
                c = r[w]
                cells.append(f"{c['ms']:8.2f} {c['ops']:7d} {c['launches']:7d} {c['syncs']:6d}")
            print(f"{n:>7} | " + " | ".join(cells))
        a, b = res[str(args.layers[0])], res[str(args.layers[-1])]
        per = {w: (b[w]["ms"] - a[w]["ms"]) / (args.layers[-1] - args.layers[0]) * 1e3 for w in what}
        print("host time per extra layer (us): " + ", ".join(f"{w} {v:.1f}" for w, v in per.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
