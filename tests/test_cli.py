"""The lora-fast command end to end, in subprocesses: inspect, convert, merge, bench, and their error paths.

merge is checked bit for bit against in-Python fusing (lora_fast.load_lora_weights(..., fuse=True)) on a tiny
SD1.5-shaped pipeline saved with a sharded UNet, and its peak memory on a 200 MB checkpoint of 50 tensors.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_fast
from lora_fast import checkpoint, io
from lora_fast.adapter import LoraAdapter, LoraLayer

pytest.importorskip("diffusers")

ENV = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")


def cli(*args, cwd=None, timeout=240):
    """Run ``python -m lora_fast ARGS``; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "lora_fast", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli_here(*args):
    """The same command in this process (cheaper than a subprocess: no torch import), output captured."""
    import contextlib
    import io as _io

    from lora_fast.cli import main

    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return _Result(rc, out.getvalue(), err.getvalue())


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lora-fast: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1.5-shaped pipeline folder (UNet sharded into 7 files), its components, and two LoRA files."""
    from lora_fast import bench
    from lora_fast.models import build_components

    root = tmp_path_factory.mktemp("cli")
    comps = build_components("sd15", "tiny", seed=0)
    pipe = root / "pipe"
    comps["unet"].save_pretrained(pipe / "unet", max_shard_size="2MB")
    comps["text_encoder"].save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text("{}")
    lora_a = root / "a.safetensors"
    bench.make_adapter(comps, "linear", 4, seed=1).save(lora_a)
    lora_b = root / "b_kohya.safetensors"
    bench.make_adapter(comps, "attn", 8, seed=2).save(lora_b, format="kohya")
    return dict(root=root, comps=comps, pipe=pipe, lora_a=lora_a, lora_b=lora_b)


def _folder_state(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(io.load_file(os.path.join(folder, name)))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


# ------------------------------------------------------------------------------------------------ help


def test_every_command_has_help():
    proc = cli("--help")  # python -m lora_fast is the lora-fast command
    assert proc.returncode == 0 and "usage: lora-fast" in proc.stdout, proc.stderr
    for command in ("inspect", "convert", "merge", "bench"):
        assert command in proc.stdout
        res = cli_here(command, "--help")
        assert res.returncode == 0 and f"usage: lora-fast {command}" in res.stdout
    res = cli_here()
    assert res.returncode == 2 and "usage" in res.stderr
    script = shutil.which("lora-fast")
    if script:  # the console script installed by pip
        proc = subprocess.run([script, "merge", "--help"], capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0 and "--allow-unmatched" in proc.stdout


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_reports_histograms_dora_conv_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = {
        "unet.a.to_q": LoraLayer(down=torch.randn(4, 8, generator=g), up=torch.randn(6, 4, generator=g), alpha=4),
        "unet.a.to_k": LoraLayer(down=torch.randn(8, 8, generator=g), up=torch.randn(6, 8, generator=g), alpha=4),
        "unet.a.to_v": LoraLayer(down=torch.randn(8, 8, generator=g), up=torch.randn(6, 8, generator=g), alpha=16),
        "unet.b.conv1": LoraLayer(down=torch.randn(4, 3, 3, 3, generator=g), up=torch.randn(5, 4, 1, 1, generator=g),
                                  alpha=2, kind="conv"),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraLayer(
            down=torch.randn(4, 8, generator=g), up=torch.randn(8, 4, generator=g), alpha=4,
            magnitude=torch.rand(8, generator=g) + 0.5),
    }
    path = tmp_path / "mixed.safetensors"
    LoraAdapter(layers, "diffusers").save(path)

    proc = cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "diffusers"
    assert info["modules"] == 5
    assert info["components"] == {"unet": 4, "text_encoder": 1}
    assert dict(map(tuple, info["ranks"])) == {4: 3, 8: 2}
    assert dict(map(tuple, info["alphas"])) == {4.0: 3, 16.0: 1, 2.0: 1}
    assert info["dora"] == 1 and info["conv"] == 1 and info["conv_kxk"] == 1
    assert info["dtypes"] == {"float32": 10}
    assert info["size_bytes"] == os.path.getsize(path)
    assert "lora_adapter_metadata" in info["metadata"]

    proc = cli_here("inspect", path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "format      diffusers" in text
    assert "varies (2 values" in text and "4: 3" in text  # rank histogram
    assert "DoRA        1 modules" in text
    assert "lora_adapter_metadata" in text


def test_inspect_kohya_and_peft_dir(tiny, tmp_path):
    proc = cli_here("inspect", tiny["lora_b"], "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "kohya" and info["ranks"] == [[8, info["modules"]]]
    lora_fast.read_lora(tiny["lora_a"]).save(tmp_path / "peft", format="peft")
    proc = cli_here("inspect", tmp_path / "peft", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "peft" and set(info["components"]) == {"unet", "text_encoder"}
    assert any(f.endswith("adapter_config.json") for f in info["files"])


def test_inspect_errors(tmp_path):
    assert_user_error(cli("inspect", tmp_path / "missing.safetensors"), "missing.safetensors", "no such file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert_user_error(cli_here("inspect", junk), "junk.safetensors")
    not_lora = tmp_path / "weights.safetensors"
    io.save_file({"conv_in.weight": torch.zeros(2, 2)}, not_lora)
    assert_user_error(cli_here("inspect", not_lora), "weights.safetensors")
    proc = cli_here("-v", "inspect", junk)  # -v: the details (traceback) too
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_inspect_pickle_refusal_names_the_cli_switch(tiny, tmp_path):
    sd = io.load_file(tiny["lora_a"])
    pickled = tmp_path / "lora.bin"
    torch.save(dict(sd), pickled)
    peft_bin = tmp_path / "peft_bin"
    peft_bin.mkdir()
    torch.save({"base_model.model.a.lora_A.weight": torch.zeros(2, 4),
                "base_model.model.a.lora_B.weight": torch.zeros(4, 2)}, peft_bin / "adapter_model.bin")
    (peft_bin / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    for path in (pickled, peft_bin):
        for command in (("inspect", path), ("convert", path, tmp_path / "o.safetensors", "--to", "kohya"),
                        ("merge", "--base", tiny["pipe"], "--lora", path, "-o", tmp_path / "m")):
            proc = cli_here(*command)
            assert_user_error(proc, "--allow-pickle", "pickle")
            assert "allow_pickle=True" not in proc.stderr  # the Python keyword is not a CLI option
    proc = cli_here("inspect", pickled, "--allow-pickle", "--json")  # and the switch it names works
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modules"] == len(lora_fast.read_lora(tiny["lora_a"]).layers)


def test_inspect_peft_component_folder_says_no_component_is_named(tmp_path):
    g = torch.Generator().manual_seed(4)
    layers = {f"unet.blocks.{i}.proj": LoraLayer(down=torch.randn(2, 6, generator=g), up=torch.randn(5, 2, generator=g),
                                                 alpha=3) for i in range(3)}
    layers["text_encoder.text_model.q_proj"] = LoraLayer(down=torch.randn(2, 6, generator=g),
                                                         up=torch.randn(5, 2, generator=g), alpha=3)
    LoraAdapter(layers, "diffusers").save(tmp_path / "peft_dir", format="peft")
    unet_dir = tmp_path / "peft_dir" / "unet"
    proc = cli_here("inspect", unet_dir)
    assert proc.returncode == 0, proc.stderr
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("components")]
    assert "(none)" not in line
    assert "none named for 3 modules" in line and "--component unet" in line  # the folder's name, as the hint
    info = json.loads(cli_here("inspect", unet_dir, "--json").stdout)
    assert info["components"] == {} and info["modules_without_component"] == 3 and info["modules"] == 3
    # --component names it; a multi-component folder names its components and has no unnamed modules
    proc = cli_here("inspect", unet_dir, "--component", "unet")
    assert [l for l in proc.stdout.splitlines() if l.startswith("components")] == ["components  unet (3)"]
    info = json.loads(cli_here("inspect", tmp_path / "peft_dir", "--json").stdout)
    assert info["components"] == {"unet": 3, "text_encoder": 1} and info["modules_without_component"] == 0


# ------------------------------------------------------------------------------------------------ convert


def test_convert_round_trip_through_every_format(tiny, tmp_path):
    src = tiny["lora_b"]  # kohya
    steps = [(src, tmp_path / "d.safetensors", "diffusers"), (tmp_path / "d.safetensors", tmp_path / "p", "peft"),
             (tmp_path / "p", tmp_path / "k.safetensors", "kohya")]
    for k, (a, b, fmt) in enumerate(steps):
        proc = (cli if k == 0 else cli_here)("convert", a, b, "--to", fmt)
        assert proc.returncode == 0, proc.stderr
        assert "identical" in proc.stdout
    first, last = lora_fast.read_lora(src), lora_fast.read_lora(tmp_path / "k.safetensors")
    assert set(first.layers) == set(last.layers)
    for k in first.layers:
        assert torch.equal(first.layers[k].delta(), last.layers[k].delta()), k


def test_convert_single_component_peft_reads_back(tmp_path):
    g = torch.Generator().manual_seed(3)
    layers = {f"unet.blocks.{i}.proj": LoraLayer(down=torch.randn(2, 6, generator=g), up=torch.randn(5, 2, generator=g),
                                                 alpha=3) for i in range(3)}
    LoraAdapter(layers, "diffusers").save(tmp_path / "u.safetensors")
    proc = cli_here("convert", tmp_path / "u.safetensors", tmp_path / "peft_u", "--to", "peft")
    assert proc.returncode == 0, proc.stderr
    # the PEFT directory has no component in its keys: converting it back needs --component
    proc = cli_here("convert", tmp_path / "peft_u", tmp_path / "back.safetensors", "--to", "diffusers", "--component", "unet")
    assert proc.returncode == 0, proc.stderr
    back = lora_fast.read_lora(tmp_path / "back.safetensors")
    assert set(back.layers) == set(layers)


def test_compare_adapters_finds_a_changed_delta():
    from lora_fast.cli import compare_adapters

    g = torch.Generator().manual_seed(0)
    layer = LoraLayer(down=torch.randn(2, 4, generator=g), up=torch.randn(3, 2, generator=g), alpha=2)
    a = LoraAdapter({"unet.x": layer, "unet.y": layer}, "diffusers")
    assert compare_adapters(a, a) == []
    changed = LoraLayer(down=layer.down, up=layer.up, alpha=2.0000002)
    b = LoraAdapter({"unet.x": changed, "unet.z": layer}, "diffusers")
    problems = compare_adapters(a, b)
    assert any(p.startswith("unet.x: delta differs") for p in problems)
    assert any(p.startswith("unet.y: only in the source") for p in problems)
    assert any(p.startswith("unet.z: only in the converted") for p in problems)


def test_convert_errors(tiny, tmp_path):
    assert_user_error(cli("convert", tmp_path / "nope.safetensors", tmp_path / "o.safetensors", "--to", "kohya"),
                      "nope.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    assert_user_error(cli_here("convert", tiny["lora_a"], existing, "--to", "kohya"), "already exists")
    proc = cli_here("convert", tiny["lora_a"], tmp_path / "o.safetensors", "--to", "onnx")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ merge


def test_merge_pipeline_matches_in_python_fuse_bit_for_bit(tiny, tmp_path):
    out = tmp_path / "merged"
    proc = cli("merge", "--base", tiny["pipe"], "--lora", tiny["lora_a"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "merged" in proc.stdout

    comps = copy.deepcopy(tiny["comps"])
    lora_fast.load_lora_weights(comps, str(tiny["lora_a"]), fuse=True)
    # same layout: shards, index, config, other files
    for sub in ("unet", "text_encoder", "scheduler"):
        assert sorted(os.listdir(out / sub)) == sorted(os.listdir(tiny["pipe"] / sub))
    assert (out / "model_index.json").read_bytes() == (tiny["pipe"] / "model_index.json").read_bytes()
    changed = 0
    for comp in ("unet", "text_encoder"):
        merged = _folder_state(out / comp)
        expected = comps[comp].state_dict()
        assert set(merged) == set(expected)
        for name, t in expected.items():
            assert _same_bits(merged[name], t), f"{comp}.{name}"
        original = _folder_state(tiny["pipe"] / comp)
        changed += sum(not _same_bits(original[n], merged[n]) for n in merged)
        assert io.read_metadata(os.path.join(out / comp, sorted(f for f in os.listdir(out / comp)
                                                                if f.endswith(".safetensors"))[0])) == {"format": "pt"}
    assert changed == len(lora_fast.read_lora(tiny["lora_a"]).layers)


def test_merge_two_weighted_adapters_half_precision_sharded_index(tiny, tmp_path):
    # fp16 base (a sharded UNet checkpoint given by its index), two adapters with strengths
    comps16 = {"unet": copy.deepcopy(tiny["comps"]["unet"]).half()}
    base = tmp_path / "unet16"
    comps16["unet"].save_pretrained(base, max_shard_size="1MB")
    index = base / "diffusion_pytorch_model.safetensors.index.json"
    out = tmp_path / "merged16"
    proc = cli("merge", "--base", index, "--lora", f"{tiny['lora_a']}:0.7", "--lora", f"{tiny['lora_b']}:-1.5",
               "-o", out, "--allow-unmatched")
    assert proc.returncode == 0, proc.stderr
    assert "matched nothing" in proc.stderr  # the text-encoder modules

    names = [lora_fast.load_lora_weights(comps16, str(p), components=["unet"]) for p in (tiny["lora_a"], tiny["lora_b"])]
    lora_fast.fuse_lora(comps16, adapter_names=names, adapter_weights=[0.7, -1.5])
    merged = _folder_state(out)
    for name, t in comps16["unet"].state_dict().items():
        assert _same_bits(merged[name], t), name
    assert json.loads((out / index.name).read_text()) == json.loads(index.read_text())


def test_merge_single_file_with_dtype_conversion(tiny, tmp_path):
    te = tiny["pipe"] / "text_encoder" / "model.safetensors"
    out = tmp_path / "te16.safetensors"
    proc = cli_here("merge", "--base", te, "--lora", tiny["lora_a"], "-o", out, "--dtype", "fp16", "--allow-unmatched")
    assert proc.returncode == 0, proc.stderr
    # fp32 base, fp16 output: the sum is formed in fp32 and rounded once to fp16
    te32 = copy.deepcopy(tiny["comps"]["text_encoder"])
    lora_fast.load_lora_weights({"text_encoder": te32}, str(tiny["lora_a"]), components=["text_encoder"], fuse=True)
    merged = io.load_file(out)
    for name, t in te32.state_dict().items():
        assert _same_bits(merged[name], t.half()), name
    assert io.read_metadata(out) == io.read_metadata(te)


def test_merge_dora_and_bias_layers_match_in_python_fuse(tiny, tmp_path):
    te = copy.deepcopy(tiny["comps"]["text_encoder"])
    g = torch.Generator().manual_seed(5)
    dora, biased = {}, {}
    for name, mod in te.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        out_f, in_f = mod.weight.shape
        key = f"text_encoder.text_model.{name}"
        dora[key] = LoraLayer(down=torch.randn(2, in_f, generator=g) * 0.1, up=torch.randn(out_f, 2, generator=g) * 0.1,
                              alpha=2, magnitude=mod.weight.detach().norm(dim=1) * 1.1)
        biased[key] = LoraLayer(down=torch.randn(3, in_f, generator=g) * 0.1, up=torch.randn(out_f, 3, generator=g),
                                alpha=1.5, bias=torch.randn(out_f, generator=g) * 0.1)
    paths = [tmp_path / "dora.safetensors", tmp_path / "bias.safetensors"]
    LoraAdapter(dora, "diffusers").save(paths[0])
    LoraAdapter(biased, "diffusers").save(paths[1])
    out = tmp_path / "te.safetensors"
    proc = cli_here("merge", "--base", tiny["pipe"] / "text_encoder" / "model.safetensors",
                    "--lora", f"{paths[0]}:0.8", "--lora", f"{paths[1]}:0.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    names = [lora_fast.load_lora_weights({"text_encoder": te}, str(p)) for p in paths]
    lora_fast.fuse_lora({"text_encoder": te}, adapter_names=names, adapter_weights=[0.8, 0.5])
    merged = io.load_file(out)
    original = io.load_file(tiny["pipe"] / "text_encoder" / "model.safetensors")
    changed = 0
    for name, t in te.state_dict().items():
        assert _same_bits(merged[name], t), name
        changed += not _same_bits(original[name], t)
    assert changed == 2 * len(dora)  # every weight and every bias


def test_merge_errors_leave_nothing_behind(tiny, tmp_path):
    from lora_fast.models import build_components

    out = tmp_path / "o"
    # adapter modules for the UNet cannot go into a text-encoder file
    te = tiny["pipe"] / "text_encoder" / "model.safetensors"
    assert_user_error(cli("merge", "--base", te, "--lora", tiny["lora_a"], "-o", tmp_path / "te.safetensors"),
                      "match nothing", "--allow-unmatched")
    # a LoRA for another model
    sdxl = build_components("sdxl", "tiny", text_encoders=False)["unet"]
    sdxl.save_pretrained(tmp_path / "sdxl_unet")
    assert_user_error(cli_here("merge", "--base", tmp_path / "sdxl_unet", "--lora", tiny["lora_a"], "-o", out,
                          "--allow-unmatched"), "does not fit this base model", str(tiny["lora_a"]))
    # single-file LDM checkpoints
    ldm = tmp_path / "ldm.safetensors"
    io.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, ldm)
    assert_user_error(cli_here("merge", "--base", ldm, "--lora", tiny["lora_a"], "-o", tmp_path / "x.safetensors"),
                      "single-file LDM")
    assert_user_error(cli_here("merge", "--base", tmp_path / "none", "--lora", tiny["lora_a"], "-o", out), "no such file")
    assert_user_error(cli_here("merge", "--base", tiny["pipe"], "--lora", tmp_path / "none.safetensors", "-o", out),
                      "none.safetensors")
    out.mkdir()
    assert_user_error(cli_here("merge", "--base", tiny["pipe"], "--lora", tiny["lora_a"], "-o", out), "already exists")
    out.rmdir()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == [] and not out.exists() and not (tmp_path / "te.safetensors").exists()


def test_merge_lora_weight_that_is_not_a_number(tiny, tmp_path):
    from lora_fast.cli import _parse_lora_arg

    out = tmp_path / "o"
    lora = str(tiny["lora_a"])
    proc = cli_here("merge", "--base", tiny["pipe"], "--lora", f"{lora}:abc", "-o", out)
    assert_user_error(proc, "'abc'", "not a number", f"{lora}:0.8")
    assert "no such file" not in proc.stderr
    assert_user_error(cli_here("merge", "--base", tiny["pipe"], "--lora", f"{lora}:nan", "-o", out), "finite")
    # a missing file is still reported as missing, with or without a weight
    missing = tmp_path / "none.safetensors"
    assert_user_error(cli_here("merge", "--base", tiny["pipe"], "--lora", f"{missing}:0.5", "-o", out),
                      f"{missing}: no such file")
    assert_user_error(cli_here("merge", "--base", tiny["pipe"], "--lora", f"{missing}:abc", "-o", out), "no such file")
    assert not out.exists()
    # the parse itself: a path that exists as given wins, even with a colon in its name
    colon = tmp_path / "a:b.safetensors"
    shutil.copy(lora, colon)
    assert _parse_lora_arg(str(colon)) == (str(colon), 1.0)
    assert _parse_lora_arg(f"{colon}:-0.25") == (str(colon), -0.25)
    assert _parse_lora_arg(f"{lora}:1e-1") == (lora, 0.1)


def test_shape_mismatch_on_load_names_the_file(tmp_path):
    """The engine's shape check (load_lora_weights and hotswap) names the LoRA file like every other load error."""
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(32, 32, bias=False)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "wrong_model.safetensors"
    LoraAdapter({"unet.proj": LoraLayer(down=torch.randn(4, 320, generator=g), up=torch.randn(320, 4, generator=g),
                                        alpha=4)}, "diffusers").save(path)
    with pytest.raises(lora_fast.LoraFormatError) as err:
        lora_fast.load_lora_weights({"unet": model}, str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: unet.proj: ") and "(320, 320)" in msg and "(32, 32)" in msg, msg
    assert not any(lora_fast.get_list_adapters({"unet": model}).values()), "nothing was loaded"

    good = tmp_path / "good.safetensors"
    LoraAdapter({"unet.proj": LoraLayer(down=torch.randn(4, 32, generator=g), up=torch.randn(32, 4, generator=g),
                                        alpha=4)}, "diffusers").save(good)
    lora_fast.load_lora_weights({"unet": model}, str(good), adapter_name="style")
    with pytest.raises(lora_fast.LoraFormatError) as err:
        lora_fast.load_lora_weights({"unet": model}, str(path), adapter_name="style", hotswap=True)
    assert str(err.value).startswith(f"{path}: unet.proj: ") and "(320, 320)" in str(err.value), str(err.value)


def test_streaming_writer_matches_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).half(), "a.weight": torch.randn(7, generator=g),
               "ids": torch.arange(4, dtype=torch.int64), "z": torch.randn(2, 2, generator=g).bfloat16(),
               "empty": torch.zeros(0, 3), "ünï": torch.ones(1)}
    io.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    entries = [(n, io._SAFETENSORS_DTYPES[t.dtype], t.shape) for n, t in tensors.items()]
    with checkpoint.StreamingSafetensorsWriter(str(tmp_path / "s.safetensors"), entries, {"format": "pt"}) as w:
        for name, _ in w.order:
            w.write(name, tensors[name])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # a failure inside the block leaves no file and no temporary file
    with pytest.raises(lora_fast.LoraFormatError):
        with checkpoint.StreamingSafetensorsWriter(str(tmp_path / "f.safetensors"), entries, None) as w:
            w.write(w.order[1][0], tensors[w.order[1][0]])  # out of order
    assert sorted(os.listdir(tmp_path)) == ["ref.safetensors", "s.safetensors"]


@pytest.mark.parametrize("metadata", [None, {"q\"uote": "back\\slash\nnewline\u0001 ✓"}])
def test_streaming_writer_escapes_and_validates_like_save_file(tmp_path, metadata):
    # Header layout comes from the one C++ writer: JSON escapes, no-metadata case and validation agree with save_file.
    tensors = {"a\"b\\c\td": torch.ones(3, dtype=torch.float64), "\u00e9\u0002": torch.zeros(2, 2, dtype=torch.int8),
               "F": torch.ones(1, dtype=torch.bool)}
    io.save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    entries = [(n, io._SAFETENSORS_DTYPES[t.dtype], t.shape) for n, t in tensors.items()]
    with checkpoint.StreamingSafetensorsWriter(str(tmp_path / "s.safetensors"), entries, metadata) as w:
        for name, _ in w.order:
            w.write(name, tensors[name])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    bad = str(tmp_path / "bad.safetensors")
    with pytest.raises(lora_fast.LoraFormatError, match=r"bad\.safetensors: tensor \"x\": name used twice"):
        checkpoint.StreamingSafetensorsWriter(bad, [("x", "F32", (1,)), ("x", "F16", (2,))], None)
    with pytest.raises(lora_fast.LoraFormatError, match="__metadata__"):
        checkpoint.StreamingSafetensorsWriter(bad, [("__metadata__", "F32", (1,))], None)


RUNTIME_IMPORT_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import torch
    import lora_fast, lora_fast.cli, lora_fast.checkpoint, lora_fast.engine, lora_fast.formats, lora_fast.fuse_on_load
    import lora_fast.io, lora_fast.live, lora_fast.per_sample
    from lora_fast import LoraAdapter, LoraLayer

    d = tempfile.mkdtemp()
    a = LoraAdapter({"unet.proj": LoraLayer(down=torch.ones(2, 4), up=torch.ones(4, 2), alpha=2)}, "diffusers")
    for fmt in ("diffusers", "peft"):
        a.save(os.path.join(d, fmt + ("" if fmt == "peft" else ".safetensors")), format=fmt)
        lora_fast.read_lora(os.path.join(d, fmt + ("" if fmt == "peft" else ".safetensors")))
    model = torch.nn.Module(); model.proj = torch.nn.Linear(4, 4)
    lora_fast.load_lora_weights({"unet": model}, os.path.join(d, "diffusers.safetensors"), adapter_name="x")
    lora_fast.fuse_lora({"unet": model})
    print(sorted(m for m in sys.modules
                 if m.split(".")[0] in ("safetensors", "diffusers", "transformers", "peft")
                 or m in ("lora_fast.bench", "lora_fast.models")))
""")


def test_runtime_never_imports_bench_models_or_safetensors():
    # bench.py/models.py (benchmark harness, diffusers-built models) load only for `lora-fast bench`; the runtime
    # reads and writes safetensors with its own C++ core, so `safetensors` is a test oracle, not a dependency.
    out = subprocess.run([sys.executable, "-c", RUNTIME_IMPORT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_adapter_never_imports_formats_and_save_still_writes_every_format(tmp_path):
    # The data model sits below the formats: LoraAdapter.save goes through the writer lora_fast.formats registers.
    import ast
    import lora_fast.adapter
    import lora_fast.formats

    tree = ast.parse(open(lora_fast.adapter.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and "formats" in m for m in imported), imported
    assert lora_fast.adapter._adapter_writer is lora_fast.formats.write_adapter
    g = torch.Generator().manual_seed(3)
    a = LoraAdapter({"unet.proj": LoraLayer(down=torch.randn(2, 4, generator=g), up=torch.randn(4, 2, generator=g),
                                            alpha=2)}, "diffusers")
    for fmt, name in (("diffusers", "d.safetensors"), ("peft", "p")):
        a.save(tmp_path / name, format=fmt)
        back = lora_fast.read_lora(str(tmp_path / name))
        (layer,) = back.layers.values()  # a one-component PEFT directory comes back without the prefix
        assert torch.equal(layer.up, a.layers["unet.proj"].up) and back.format == fmt, fmt
    with pytest.raises(lora_fast.LoraFormatError, match="unknown LoRA format"):
        a.save(tmp_path / "x.safetensors", format="nope")


def test_one_dtype_table_from_the_core():
    # Python's names and sizes are the C++ table's; every torch dtype io maps has the element size the table says.
    assert list(io.DTYPE_BITS)[:3] == ["BOOL", "F4", "F6_E2M3"] and list(io.DTYPE_BITS)[-1] == "U64"
    assert len(io.DTYPE_BITS) == 22 and io.DTYPE_BITS["F6_E3M2"] == 6 and io.DTYPE_BITS["C64"] == 64
    for name, dt in io._TORCH_DTYPES.items():
        bits = torch.empty(0, dtype=dt).element_size() * 8
        assert bits == (8 if name == "F4" else io.DTYPE_BITS[name]), name  # torch packs F4 two per byte
    assert io.tensor_nbytes("F4", (3, 4)) == 6 and io.tensor_nbytes("BF16", (2, 3)) == 12
    assert not hasattr(checkpoint, "DTYPE_ORDER") and checkpoint.PICKLE_SUFFIXES is lora_fast.formats.PICKLE_SUFFIXES


MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, sys, threading, time
    import psutil
    import lora_fast.cli, lora_fast.checkpoint, lora_fast.kernels.merge, torch  # imports before the baseline

    proc = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    baseline = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = lora_fast.cli.main(sys.argv[1:])
    done.set()
    t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print("EXTRA_MB", (peak[0] - baseline) / 2**20, "RC", rc)
""")


def test_merge_memory_stays_far_below_the_checkpoint(tmp_path):
    n_tensors, rows, cols = 50, 1024, 1024  # 50 × 4 MiB fp32 = 200 MiB
    base = tmp_path / "big.safetensors"
    entries = [(f"blocks.{i}.proj.weight", "F32", (rows, cols)) for i in range(n_tensors)]
    g = torch.Generator().manual_seed(0)
    block = torch.randn(rows, cols, generator=g)
    shift = {}
    with checkpoint.StreamingSafetensorsWriter(str(base), entries, {"format": "pt"}) as w:
        for k, (name, _) in enumerate(w.order):
            shift[name] = k
            w.write(name, block + k)
    layers = {f"unet.blocks.{i}.proj": LoraLayer(down=torch.randn(4, cols, generator=g) * 0.01,
                                                 up=torch.randn(rows, 4, generator=g), alpha=4)
              for i in range(n_tensors)}
    lora = tmp_path / "lora.safetensors"
    LoraAdapter(layers, "diffusers").save(lora)
    out = tmp_path / "merged.safetensors"
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "merge", "--base", str(base), "--lora", str(lora),
                           "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr
    extra_mb = float(proc.stdout.split("EXTRA_MB")[1].split()[0])
    print(f"merge of a {os.path.getsize(base) / 2**20:.0f} MiB checkpoint: {extra_mb:.1f} MiB above baseline")
    assert "RC 0" in proc.stdout
    size_mb = os.path.getsize(base) / 2**20
    assert size_mb > 199
    assert extra_mb < 60, f"merge used {extra_mb:.0f} MB above its baseline for a {size_mb:.0f} MB checkpoint"
    # and it did merge: spot-check two tensors against the kernel on the same inputs
    merged = io.load_file(out)
    for i in (0, n_tensors - 1):
        layer = layers[f"unet.blocks.{i}.proj"]
        ref = torch.nn.Module()
        ref.blocks = torch.nn.ModuleDict({str(i): torch.nn.Module()})
        ref.blocks[str(i)].proj = torch.nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            ref.blocks[str(i)].proj.weight.copy_(block + shift[f"blocks.{i}.proj.weight"])
        lora_fast.load_lora_weights(ref, LoraAdapter({f"blocks.{i}.proj": layer}, "diffusers"), fuse=True)
        assert _same_bits(merged[f"blocks.{i}.proj.weight"], ref.blocks[str(i)].proj.weight.data)


# ------------------------------------------------------------------------------------------------ bench


def test_bench_tiny_writes_json_and_chart(tmp_path):
    out = tmp_path / "bench-out"
    proc = cli("bench", "--size", "tiny", "--dtype", "fp16", "--repeats", "3", "--warmup", "1", "--threads", "1",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "sd15-attn-r4" in proc.stdout
    for section in ("Warm: median of 3 timed fuse/unfuse cycles per library after 1 untimed warm-up cycles",
                    "First call after loading", "Exactness", "Headline", "load average (1 min)"):
        assert section in proc.stdout, section
    report = json.loads((out / "bench.json").read_text())
    assert report["repeats"] == 3 and report["warmup"] == 1 and report["machine"]["threads"] == 1
    assert report["machine"]["load_average_before"] is not None
    (r,) = report["results"]
    assert r["case"] == "sd15-attn-r4" and r["dtype"] == "fp16" and r["floor_s"] > 0
    for lib in ("lora_fast", "diffusers"):
        d = r[lib]
        assert len(d["fuse_times_s"]) == len(d["unfuse_times_s"]) == 3, lib
        assert d["fuse_s"] == sorted(d["fuse_times_s"])[1]  # the median of the warm cycles only
        assert d["first_fuse_s"] > 0 and d["first_unfuse_s"] > 0
        assert d["load_fuse_s"] == d["load_s"] + d["first_fuse_s"]
    assert r["lora_fast"]["changed_elements_after_cycles"] == 0
    assert r["lora_fast"]["fuse_on_load_s"] > 0
    assert r["lora_fast"]["safe_fuse_s"] > 0 and r["lora_fast"]["uncached_fuse_s"] > 0
    assert "lora_fast's fuse paths, warm medians" in proc.stdout
    assert report["floor"]["copy_bytes_per_s"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_times_the_first_call_apart_from_the_warm_median(monkeypatch):
    """Deterministic clock: the first fuse/unfuse cost 100 and 50, warm-up cycles 7, timed ones 1..5."""
    from lora_fast import bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    costs = {"fuse": [100.0, 7.0, 7.0, 3.0, 1.0, 5.0, 2.0, 4.0], "unfuse": [50.0, 7.0, 7.0, 30.0, 10.0, 50.0, 20.0, 40.0]}
    calls = []

    def step(kind):
        calls.append(kind)
        clock[0] += costs[kind].pop(0)

    seen = []
    d = bench.time_cycles(lambda: step("fuse"), lambda: step("unfuse"), repeats=5, warmup=2,
                          after_first_fuse=lambda: seen.append(list(calls)),
                          after_first_cycle=lambda: seen.append(list(calls)))
    assert calls == ["fuse", "unfuse"] * 8
    assert seen == [["fuse"], ["fuse", "unfuse"]]
    assert d["first_fuse_s"] == 100 and d["first_unfuse_s"] == 50
    assert d["fuse_times_s"] == [3, 1, 5, 2, 4] and d["fuse_s"] == 3 and d["unfuse_s"] == 30
    assert d["fuse_quartiles_s"] == [2, 4] and d["warmup_cycles"] == 2


def _report(lf_fuse, df_fuse, load=0.1, quartiles=None):
    def lib(fuse, first):
        return dict(load_s=0.01, first_fuse_s=first, first_unfuse_s=first, fuse_s=fuse, unfuse_s=fuse,
                    load_fuse_s=0.01 + first, fuse_quartiles_s=quartiles or [fuse, fuse],
                    unfuse_quartiles_s=[fuse, fuse], fuse_times_s=[fuse], unfuse_times_s=[fuse])
    lf, df = lib(lf_fuse, 1.0), lib(df_fuse, 9.0)
    lf.update(changed_elements_after_cycles=0, sample_elements=100)
    df.update(changed_elements_after_one_cycle=9)
    return dict(repeats=11, warmup=2, floor=dict(copy_bytes_per_s=1e10, matmul_flops_per_s=1e11),
                machine=dict(processor="cpu", threads=2, device="cpu", torch="x", cpus_usable=2,
                             load_average_before=load, load_average_after=load),
                results=[dict(case="sd15-attn-r4", dtype="fp16", modules=176, params=1, floor_s=0.01,
                              lora_fast=lf, diffusers=df)])


def test_bench_table_headline_is_the_warm_ratio_and_busy_runs_are_flagged():
    from lora_fast import bench

    text = bench.format_table(_report(0.05, 0.2))
    assert "median of 11 timed" in text and "after 2 untimed warm-up" in text
    assert "Headline, lora_fast's warm fuse speed-up over diffusers: 4.0x (sd15-attn-r4 fp16)" in text
    assert "9.0x faster" in text  # the first calls (1 s vs 9 s) in their own table, not in the headline
    assert "0 (bit-exact)" in text and "9.00%" in text
    assert "warning" not in text
    assert "fuse paths" not in text  # a report without those figures (an older bench.json) has no such table
    report = _report(0.05, 0.2)
    report["results"][0]["lora_fast"].update(safe_fuse_s=0.055, uncached_fuse_s=0.08, fuse_on_load_s=0.096)
    paths = bench.format_table(report).split("lora_fast's fuse paths")[1].split("Exactness")[0]
    # fuse 50.0, unfuse/fuse 1.00x, safe 55.0 (1.10x the fuse), uncached 80.0, load 10.0, on-load 96.0 = 1.20x of 80
    assert paths.split()[-8:] == ["50.0", "1.00x", "55.0", "1.10x", "80.0", "10.0", "96.0", "1.20x"], paths
    busy = bench.format_table(_report(0.05, 0.2, load=1.9))
    assert "warning: other work was running (load average 1.90 on 2 CPUs)" in busy
    noisy = bench.format_table(_report(0.05, 0.2, quartiles=[0.04, 0.07]))
    assert "warm times varied by more than 20% (sd15-attn-r4 fp16)" in noisy and "60%" in noisy


def test_bench_defaults_are_documented():
    from lora_fast import bench

    help_text = " ".join(cli_here("bench", "--help").stdout.split())
    assert f"(default {bench.REPEATS}:" in help_text and f"(default {bench.WARMUP})" in help_text
    docs = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")).read().split())
    assert f"the median of {bench.REPEATS} timed" in docs and f"Why {bench.REPEATS}:" in docs
    assert f"{bench.WARMUP} untimed **warm-up** cycles" in docs and f"Why {bench.WARMUP} warm-up cycles" in docs


def test_bench_errors():
    proc = cli_here("bench", "--dtype", "fp8", "--size", "tiny")
    assert_user_error(proc, "fp8")
    proc = cli_here("bench", "--model", "sd9")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    for bad, needle in ((("--repeats", "0"), "--repeats must be >= 1"), (("--warmup", "-1"), "--warmup must be >= 0"),
                        (("--threads", "0"), "--threads must be >= 1")):
        proc = cli_here("bench", "--size", "tiny", *bad)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------ user-facing text

#: references a user cannot follow: files outside the repository, a tracker they cannot see
_PRIVATE_REFERENCES = re.compile(r"/work/|\.\./shared|shared/reference|\bissues? ?#?\d+|\bthe issue'?s?\b", re.I)


def test_user_facing_text_stands_on_its_own():
    root = os.path.join(os.path.dirname(__file__), "..")
    files = ["README.md"]
    for folder, suffix in (("docs", ".md"), ("examples", ".py"), ("lora_fast", ".py")):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            files += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if n.endswith(suffix)]
    assert len(files) > 10
    found = []
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if _PRIVATE_REFERENCES.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    for command in ("inspect", "convert", "merge", "bench"):
        out = cli_here(command, "--help").stdout
        found += [f"lora-fast {command} --help: {m.group(0)}" for m in _PRIVATE_REFERENCES.finditer(out)]
    assert found == []
