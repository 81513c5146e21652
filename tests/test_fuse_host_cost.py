"""The Triton fuse/unfuse path's host cost does not grow with the number of layers (issue 17).

The engine runs on the Triton backend under ``TRITON_INTERPRET=1`` (in a subprocess, as the other kernel tests do),
with Triton made the default for CPU tensors as it is for CUDA tensors on a GPU machine. For 5 and for 50 blocks
(each a Linear, a 3x3 conv and an embedding, two adapters fused together, one with fp16 factors), a fuse, a
``safe_fusing`` fuse and an unfuse are counted three ways: torch operations (a TorchDispatchMode counter, without
the interpreter's own copies inside a launch), kernel launches and host reads of device values (the launcher's
counters; on a GPU each host read is a synchronization). The counts must be the same for both sizes. The same runs
check the guarantees: fused bits equal to the C++ CPU kernel's on an identical model, exact unfuse, and a
non-finite result under ``safe_fusing`` that changes nothing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from triton_support import exact_fma_interpreter

# The blocks both worker scripts fuse: per block a Linear, a 3x3 conv and an embedding (``dtype`` set by the script),
# and an adapter over them with factors in ``fdtype`` (``nan``: one NaN factor element).
BLOCKS = textwrap.dedent(
    """
    def model(n, seed=0):
        torch.manual_seed(seed)
        m = nn.ModuleDict()
        for i in range(n):
            m[f"l{i}"] = nn.Linear(24, 40)
            m[f"c{i}"] = nn.Conv2d(6, 10, 3, padding=1)
            m[f"e{i}"] = nn.Embedding(11, 9)
        return m.to(dtype)

    def adapter(n, seed, fdtype, nan=False):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(fdtype)
        layers = {}
        for i in range(n):
            layers[f"l{i}"] = LoraLayer(down=r(4, 24), up=r(40, 4), alpha=3.0, kind="linear")
            layers[f"c{i}"] = LoraLayer(down=r(2, 6, 3, 3), up=r(10, 2, 1, 1), alpha=2.0, kind="conv")
            layers[f"e{i}"] = LoraLayer(down=r(3, 11), up=r(9, 3), alpha=1.5, kind="embedding")
        if nan:
            layers[f"l{n // 2}"].up[3, 1] = float("nan")
        return LoraAdapter(layers, "diffusers")
    """
)


# Launch groups of those blocks' fuse (merge._group_jobs): the linears, whose fp16 weight rows are 48 bytes (vector
# accesses), and the convs and embeddings, whose rows are 108 and 18 bytes (scalar accesses).
GROUPS = 2


def _with_blocks(script: str) -> str:
    return script.replace("# <blocks: model(n), adapter(n, seed, fdtype)>\n", BLOCKS)


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    import lora_fast
    from lora_fast import LoraAdapter, LoraLayer, LoraFusionError
    from lora_fast.kernels import merge as M, probe as P

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.paused = False
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused:
                self.n += 1
            return func(*args, **(kwargs or {}))

    counter = None
    _launch = M._launch
    def launch(*a, **k):  # the interpreter's own tensor copies inside a launch are not the launcher's operations
        if counter is not None:
            counter.paused = True
        try:
            _launch(*a, **k)
        finally:
            if counter is not None:
                counter.paused = False
    M._launch = launch

    dtype = torch.float16
    BITS = torch.int16

    # <blocks: model(n), adapter(n, seed, fdtype)>

    def state_bits(m):
        return {k: v.clone().view(BITS) for k, v in m.state_dict().items()}

    def same(m, snap):
        return all(torch.equal(v.view(BITS), snap[k]) for k, v in m.state_dict().items())

    def measure(fn):
        global counter
        s0 = M.triton_stats.snapshot()
        counter = Count()
        with counter:
            fn()
        ops, counter = counter.n, None
        s1 = M.triton_stats.snapshot()
        return {"ops": ops, **{k: s1[k] - s0[k] for k in s0}}

    assert P.usable("merge", torch.device("cpu"), dtype, strict=True)  # the first-use probe, apart from the counts
    out = {}
    for n in (5, 50):
        M._DEFAULT["cpu"] = "triton"
        m = model(n)
        lora_fast.load_lora_weights(m, adapter(n, 1, torch.float16), adapter_name="a")
        lora_fast.load_lora_weights(m, adapter(n, 2, torch.float32), adapter_name="b")
        lora_fast.load_lora_weights(m, adapter(n, 3, torch.float32, nan=True), adapter_name="bad")
        base = state_bits(m)
        kw = dict(adapter_names=["a", "b"], adapter_weights=[0.8, 0.55], lora_scale=0.9)
        counts = {}
        counts["fuse"] = measure(lambda: lora_fast.fuse_lora(m, **kw))
        fused = state_bits(m)
        counts["unfuse"] = measure(lambda: lora_fast.unfuse_lora(m))
        assert same(m, base), "unfuse is not exact"
        counts["safe fuse"] = measure(lambda: lora_fast.fuse_lora(m, safe_fusing=True, **kw))
        assert all(torch.equal(fused[k], v) for k, v in state_bits(m).items()), "safe fuse gave other bits"
        lora_fast.unfuse_lora(m)
        assert same(m, base)

        def bad():
            try:
                lora_fast.fuse_lora(m, safe_fusing=True, adapter_names=["a", "bad"])
            except LoraFusionError:
                return
            raise AssertionError("a NaN factor was fused under safe_fusing")
        counts["safe fuse, non-finite"] = measure(bad)
        assert same(m, base), "a refused safe fuse changed weights"

        # the same fuse through the C++ CPU kernel on an identical model: the same bits
        M._DEFAULT["cpu"] = "cpu"
        ref = model(n)
        lora_fast.load_lora_weights(ref, adapter(n, 1, torch.float16), adapter_name="a")
        lora_fast.load_lora_weights(ref, adapter(n, 2, torch.float32), adapter_name="b")
        lora_fast.fuse_lora(ref, **kw)
        assert all(torch.equal(fused[k], v) for k, v in state_bits(ref).items()), "Triton and C++ bits differ"
        out[n] = counts
    print("COUNTS " + json.dumps(out))
    """
)
SCRIPT = _with_blocks(SCRIPT)


def _counts(script: str) -> tuple:
    """The COUNTS a worker script prints, for 5 and for 50 blocks (run interpreted, in a subprocess)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(lines[-1][len("COUNTS "):])
    return counts["5"], counts["50"]


@exact_fma_interpreter
def test_fuse_and_unfuse_host_cost_is_independent_of_the_layer_count():
    small, large = _counts(SCRIPT)
    assert small == large, (small, large)
    # GROUPS launch groups (CPU, fp16): fuse = per group a counting pass and a writing pass, one host read for all;
    # unfuse = one pass per group, no read
    g = GROUPS
    assert small["fuse"]["launches"] == 2 * g and small["fuse"]["syncs"] == 1, small
    # the safe_fusing fuse repeats the first one's adapters and scales: one writing pass that also checks, one read
    assert small["safe fuse"]["launches"] == g and small["safe fuse"]["syncs"] == 1, small
    assert small["safe fuse, non-finite"]["launches"] == g and small["safe fuse, non-finite"]["syncs"] == 1, small
    # unfuse reuses the fuse's table on the device: nothing rebuilt, nothing uploaded
    assert small["unfuse"]["launches"] == g and small["unfuse"]["syncs"] == 0 and small["unfuse"]["uploads"] == 0, small
    assert small["fuse"]["uploads"] == small["safe fuse, non-finite"]["uploads"] == g, small
    assert small["safe fuse"]["uploads"] == 0, small


REPEAT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from torch import nn
    import lora_fast
    from lora_fast import LoraAdapter, LoraLayer, LoraFusionError
    from lora_fast.kernels import merge as M, probe as P

    dtype, BITS = torch.float16, torch.int16
    M._DEFAULT["cpu"] = "triton"
    assert P.usable("merge", torch.device("cpu"), dtype, strict=True)

    # <blocks: model(n), adapter(n, seed, fdtype)>

    def bits(m):
        return {k: v.clone().view(BITS) for k, v in m.state_dict().items()}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(m):
        st = lora_fast.engine.component_state(m)
        out = []
        for step in st.fused:
            for r in step.records:
                out.append((r.offsets.clone(), r.cols.clone(), r.value.clone().view(BITS)))
        return out

    def same_records(a, b):
        return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))

    def counted(fn):
        s0 = M.triton_stats.snapshot()
        fn()
        s1 = M.triton_stats.snapshot()
        return {k: s1[k] - s0[k] for k in s0}

    out = {}
    for n in (5, 50):
        m = model(n)
        lora_fast.load_lora_weights(m, adapter(n, 1, torch.float16), adapter_name="a")
        lora_fast.load_lora_weights(m, adapter(n, 2, torch.float32), adapter_name="b")
        base = bits(m)
        kw = dict(adapter_names=["a", "b"], adapter_weights=[0.8, 0.55], lora_scale=0.9)
        c = {}
        c["first"] = counted(lambda: lora_fast.fuse_lora(m, **kw))
        fused, recs = bits(m), records(m)
        lora_fast.unfuse_lora(m)
        assert same(bits(m), base), "unfuse after the first fuse is not exact"
        c["repeat"] = counted(lambda: lora_fast.fuse_lora(m, **kw))
        assert same(bits(m), fused), "the repeated fuse gave other bits"
        assert same_records(records(m), recs), "the repeated fuse gave other records"
        c["unfuse"] = counted(lambda: lora_fast.unfuse_lora(m))
        assert same(bits(m), base), "unfuse after a repeated fuse is not exact"
        if n == 5:
            for cycle in range(6):  # many cycles: every one a repeat, every unfuse exact
                c[f"cycle {cycle}"] = counted(lambda: lora_fast.fuse_lora(m, **kw))
                assert same(bits(m), fused)
                lora_fast.unfuse_lora(m)
                assert same(bits(m), base), cycle
            # safe_fusing: the cached writing pass checks too, and the call reads the flags once: no upload
            c["safe"] = counted(lambda: lora_fast.fuse_lora(m, safe_fusing=True, **kw))
            assert same(bits(m), fused)
            lora_fast.unfuse_lora(m)
            # another scale, another adapter set: other keys, full fuses (then repeats of their own)
            c["other scale"] = counted(lambda: lora_fast.fuse_lora(m, **dict(kw, lora_scale=0.7)))
            lora_fast.unfuse_lora(m)
            c["other set"] = counted(lambda: lora_fast.fuse_lora(m, adapter_names=["a"], lora_scale=0.9))
            lora_fast.unfuse_lora(m)
            c["other set again"] = counted(lambda: lora_fast.fuse_lora(m, adapter_names=["a"], lora_scale=0.9))
            lora_fast.unfuse_lora(m)
            assert same(bits(m), base)
            c["back to the first"] = counted(lambda: lora_fast.fuse_lora(m, **kw))
            assert same(bits(m), fused)
            lora_fast.unfuse_lora(m)
            # a torch-visible change of a weight (its _version moves): a full fuse, bits as on a fresh model
            with torch.no_grad():
                m["l1"].weight.mul_(0.5)
            base2 = bits(m)
            c["after copy_"] = counted(lambda: lora_fast.fuse_lora(m, **kw))
            lora_fast.unfuse_lora(m)
            assert same(bits(m), base2)
            # a change torch cannot see (.data keeps its own version counter): the repeated fuse leaves the tiles
            # whose record counts differ unfused, unfuse restores exactly and says which layer
            m["l3"].weight.data.mul_(3.0)
            m["c2"].weight.data[:, 0] = 1000.0
            changed = bits(m)
            lora_fast.fuse_lora(m, **kw)
            try:
                lora_fast.unfuse_lora(m)
            except LoraFusionError as e:
                msg = str(e)
            else:
                raise AssertionError("a weight changed through .data went unnoticed")
            assert "l3" in msg and "c2" in msg and "l1" not in msg, msg
            assert same(bits(m), changed), "unfuse after a detected change is not exact"
            c["after the error"] = counted(lambda: lora_fast.fuse_lora(m, **kw))  # the cache was dropped
            lora_fast.unfuse_lora(m)
            assert same(bits(m), changed)
            # the same, noticed by fused_record_bytes while fused
            lora_fast.fuse_lora(m, **kw)
            lora_fast.unfuse_lora(m)
            m["l2"].weight.data.mul_(3.0)
            changed = bits(m)
            lora_fast.fuse_lora(m, **kw)
            try:
                lora_fast.engine.fused_record_bytes(m)
            except LoraFusionError as e:
                assert "l2" in str(e), str(e)
            else:
                raise AssertionError("fused_record_bytes did not report the change")
            lora_fast.unfuse_lora(m)
            assert same(bits(m), changed)
            # deleting an adapter drops the cached calls it takes part in
            lora_fast.fuse_lora(m, **kw)
            lora_fast.unfuse_lora(m)
            st = lora_fast.engine.component_state(m)
            assert st.fuse_memo
            lora_fast.delete_adapters(m, "b")
            assert not st.fuse_memo
            # a repeat that safe_fusing refuses: the cached writing pass flags the NaN, one restoring pass puts every
            # weight back from the records it just wrote, and nothing is changed
            lora_fast.load_lora_weights(m, adapter(n, 3, torch.float32, nan=True), adapter_name="bad")
            base = bits(m)
            lora_fast.fuse_lora(m, adapter_names=["a", "bad"])  # without safe_fusing: fused, NaN and all
            lora_fast.unfuse_lora(m)
            assert same(bits(m), base)

            def refused():
                try:
                    lora_fast.fuse_lora(m, adapter_names=["a", "bad"], safe_fusing=True)
                except LoraFusionError:
                    return
                raise AssertionError("a NaN factor was fused under safe_fusing")
            c["safe, refused repeat"] = counted(refused)
            assert same(bits(m), base), "a refused repeated safe fuse changed weights"
            assert not st.fused
        out[n] = c
    print("COUNTS " + json.dumps(out))
    """
)
REPEAT = _with_blocks(REPEAT)


@exact_fma_interpreter
def test_repeated_fuse_is_one_launch_and_no_host_read():
    """A fuse of the same adapters at the same scales after an exact unfuse writes at the cached record positions:
    one launch per launch group, no host read, no upload, for 5 and 50 blocks alike, with the first fuse's bits and records and exact
    unfuse over many cycles; safe_fusing reads the flags once (a refusal restores in one more pass); other scales or
    adapters miss; a weight changed through ``.data`` is found and named, and unfuse stays exact."""
    small, large = _counts(REPEAT)
    g = GROUPS
    for c in (small, large):
        assert c["first"] == {"launches": 2 * g, "syncs": 1, "uploads": g}, c
        assert c["repeat"] == {"launches": g, "syncs": 0, "uploads": 0}, c
        assert c["unfuse"] == {"launches": g, "syncs": 0, "uploads": 0}, c
    for cycle in range(6):
        assert small[f"cycle {cycle}"] == {"launches": g, "syncs": 0, "uploads": 0}, small
    assert small["safe"] == {"launches": g, "syncs": 1, "uploads": 0}, small
    assert small["safe, refused repeat"] == {"launches": 2 * g, "syncs": 1, "uploads": 0}, small
    for k in ("other scale", "other set", "after copy_", "after the error"):
        assert small[k] == {"launches": 2 * g, "syncs": 1, "uploads": g}, (k, small)
    assert small["other set again"] == small["back to the first"] == {"launches": g, "syncs": 0, "uploads": 0}, small
