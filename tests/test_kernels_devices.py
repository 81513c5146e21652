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
