"""Multi-GPU safety by construction (issue 16 item 2) and staged weights copied once (issue 16 item 4).

Triton launches on the current CUDA device whatever its tensors' device, so the merge launcher groups jobs by
(device, dtype) and launches each group, with its tables allocated there, under that device; shrink/expand launch
under the activation's device and refuse tables from another device. Without two GPUs this is checked with a
stand-in kernel that records, for every launch, the device made current and the device of every tensor it gets
(CPU and ``meta`` tensors play two devices). On a machine with two GPUs the last test runs a real fuse and unfuse on
cuda:1 with cuda:0 current."""

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fast
from lora_fast import LoraAdapter, LoraLayer, fuse_on_load
from lora_fast import kernels as K
from lora_fast.kernels import merge as M
from lora_fast.kernels import shrink_expand as S


class Recorder:
    """Stands in for lora_fast.kernels.device_guard (tracks the current device) and for a Triton kernel."""

    def __init__(self):
        self.current = [torch.device("cpu")]
        self.launches = []

    def guard(self, device):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.current.append(torch.device(device))

            def __exit__(self, *exc):
                rec.current.pop()

        return _Ctx()

    def kernel(self):
        rec = self

        class _Kernel:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    rec.launches.append((rec.current[-1], {t.device for t in tensors}, kw.get("MODE")))
                    if kw.get("MODE") == M.MODE_COUNT and args[2].device.type == "cpu":
                        args[2].zero_()  # no record anywhere
                return run

        return _Kernel()


def jobs_on(device, dtype, n=2):
    return [M.MergeJob(torch.zeros(5 + i, 7, dtype=dtype, device=device),
                       torch.zeros(5 + i, 2, device=device), torch.zeros(2, 7, device=device)) for i in range(n)]


def test_jobs_are_grouped_by_device_and_dtype():
    jobs = (jobs_on("cpu", torch.float16, 1) + jobs_on("meta", torch.float16, 1) + jobs_on("cpu", torch.float32, 1)
            + jobs_on("meta", torch.float16, 1) + jobs_on("cpu", torch.float16, 1))
    groups = M._group_jobs(jobs)
    assert [k[:2] for k in groups] == [(torch.device("cpu"), torch.float16), (torch.device("meta"), torch.float16),
                                       (torch.device("cpu"), torch.float32)]
    assert list(groups.values()) == [[0, 4], [1, 3], [2]]


def test_jobs_with_vector_tiles_keep_a_launch_group_of_their_own():
    """A weight whose tiles allow vector accesses (16-byte rows and base) does not share a group with a misaligned
    weight: the kernel is specialized per group (merge._Plan.spec), LyCORIS terms or not."""
    def job(cols, terms=False):
        w = torch.zeros(4, cols, dtype=torch.float16)
        t = [M.Term("kron", torch.ones(1, 1), torch.zeros(4, cols))] if terms else None
        return M.MergeJob(w, torch.zeros(4, 2), torch.zeros(2, cols), terms=t)

    jobs = [job(16), job(7), job(16), job(16, terms=True), job(8), job(36)]
    groups = M._group_jobs(jobs)
    assert [k[2] for k in groups] == [True, False]
    assert list(groups.values()) == [[0, 2, 3, 4], [1, 5]]
    plans = [M._Plan(jobs, idxs, torch.device("cpu"), torch.float16) for idxs in groups.values()]
    assert [p.spec["WV"] for p in plans] == [8, 0] and [p.spec["TERMS"] for p in plans] == [True, False]


def test_each_merge_group_launches_under_its_device_with_its_tables_there(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(K, "device_guard", rec.guard)
    monkeypatch.setattr(M, "_triton_kernel", rec.kernel)
    jobs = jobs_on("cpu", torch.float16) + jobs_on("meta", torch.float16) + jobs_on("meta", torch.bfloat16)
    M._triton_run(jobs, negate=False, record=False, check_finite=False)  # no host read: meta tensors can take part
    assert len(rec.launches) == 3
    for current, devices, mode in rec.launches:
        assert devices == {current}, (current, devices)  # every table and tensor on the device made current
    assert [c.type for c, _, _ in rec.launches] == ["cpu", "meta", "meta"]
    # with records: the counting and writing passes of both CPU groups, each under its device
    rec.launches.clear()
    jobs = jobs_on("cpu", torch.float16) + jobs_on("cpu", torch.float32)
    records, _ = M._triton_run(jobs, negate=False, record=True, check_finite=True)
    assert [m for _, _, m in rec.launches] == [M.MODE_COUNT, M.MODE_COUNT, M.MODE_WRITE, M.MODE_WRITE]
    assert all(devices == {current} for current, devices, _ in rec.launches)
    assert records.count() == 0


def test_shrink_and_expand_launch_under_the_activation_device_and_refuse_foreign_tables(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(K, "device_guard", rec.guard)
    monkeypatch.setattr(S, "_kernels", lambda: (rec.kernel(), rec.kernel()))
    g = torch.Generator().manual_seed(0)
    groups = S.make_groups([torch.randn(2, 8, generator=g)], [torch.randn(6, 2, generator=g)], [0.5])
    rows = S.build_row_map([[(0, 1.0)], [(0, 0.5)]], 2, 3, "cpu")
    x = torch.randn(6, 8, generator=g)
    out = torch.randn(6, 6, generator=g)
    h = torch.zeros(rows.num_entries, 16)
    S._triton_shrink(x, h, groups, rows)
    S._triton_expand(out, h, groups, rows, 0, 1.0)
    assert len(rec.launches) == 2 and all(devices == {current} for current, devices, _ in rec.launches)
    meta_groups = S.make_groups([torch.zeros(2, 8, device="meta")], [torch.zeros(6, 2, device="meta")], [0.5])
    with pytest.raises(ValueError, match="adapter table is on meta"):
        S._triton_shrink(x, h, meta_groups, rows)


# ------------------------------------------------------------------------------------ staged weights (16.4)


class CopiesInto(TorchDispatchMode):
    """Counts in-place copies into each watched tensor's memory."""

    def __init__(self, watched):
        super().__init__()
        self.watched = {t.data_ptr(): name for name, t in watched.items()}
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and args[0].data_ptr() in self.watched:
            self.n[self.watched[args[0].data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def staged_model(n_linear=6):
    torch.manual_seed(0)
    m = nn.ModuleDict({f"l{i}": nn.Linear(8, 8) for i in range(n_linear)})
    for i in range(2):
        conv = nn.Conv2d(4, 6, 3)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)  # no 2-D alias: staged
        m[f"c{i}"] = conv
    return m


def staged_adapter(m, seed):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in m.items():
        if isinstance(mod, nn.Linear):
            layers[name] = LoraLayer(down=torch.randn(2, 8, generator=g) * 0.1, up=torch.randn(8, 2, generator=g) * 0.1,
                                     alpha=2.0, kind="linear")
        else:
            layers[name] = LoraLayer(down=torch.randn(2, 4, 3, 3, generator=g) * 0.1,
                                     up=torch.randn(6, 2, 1, 1, generator=g) * 0.1, alpha=2.0, kind="conv")
    return LoraAdapter(layers, "diffusers")


def test_fuse_copies_each_staged_weight_back_once():
    m = staged_model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    lora_fast.load_lora_weights(m, staged_adapter(m, 1), adapter_name="a")
    lora_fast.load_lora_weights(m, staged_adapter(m, 2), adapter_name="b")
    watched = {f"c{i}": m[f"c{i}"].weight for i in range(2)}
    with CopiesInto(watched) as c:
        lora_fast.fuse_lora(m, adapter_names=["a", "b"])
    assert dict(c.n) == {"c0": 1, "c1": 1}  # was once per job of the component (8 each here)
    with CopiesInto(watched) as c:
        lora_fast.unfuse_lora(m)
    assert dict(c.n) == {"c0": 1, "c1": 1}
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())


def test_fuse_on_load_copies_each_staged_weight_back_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FAST_STREAM_FUSE", "1")
    m = staged_model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    path = str(tmp_path / "a.safetensors")
    staged_adapter(m, 1).save(path, format="diffusers")
    watched = {f"c{i}": m[f"c{i}"].weight for i in range(2)}
    with CopiesInto(watched) as c:
        # tiny batches: several fuse calls, the staged weights in different ones
        fuse_on_load.load_and_fuse(m, path, "a", ring_bytes=4096, chunk_bytes=1024, threads=2, batch_bytes=512)
    assert dict(c.n) == {"c0": 1, "c1": 1}  # earlier batches' staged weights used to be copied again at every flush
    lora_fast.unfuse_lora(m)
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())


@pytest.mark.cuda
def test_fuse_on_the_second_gpu_with_the_first_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    m = staged_model().to("cuda:1").half()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    lora_fast.load_lora_weights(m, staged_adapter(m, 1), adapter_name="a")
    with torch.cuda.device(0):
        lora_fast.fuse_lora(m, safe_fusing=True)
        ref = staged_model().half()
        lora_fast.load_lora_weights(ref, staged_adapter(ref, 1), adapter_name="a")
        lora_fast.fuse_lora(ref)
        assert all(torch.equal(v.cpu(), ref.state_dict()[k]) for k, v in m.state_dict().items())
        lora_fast.unfuse_lora(m)
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())
