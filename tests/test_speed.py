"""Speed levers of issue 21 that test_train.py does not cover: the compiled gradient penalty in
the step, the compile cache across processes, and benchmarks/train_step.py's bookkeeping."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from furlib.models import load_vae
from furlib.training import speed
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer, step_generator

ROOT = Path(__file__).resolve().parent.parent
needs_cpp = pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c),
                               reason="torch.compile builds C++ kernels on the CPU: needs a C++ compiler")


def bench_module(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def critic_step_grads(trainer: Trainer, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logs = trainer.critic_grads(x, recon, step_generator(trainer.device, 0, 0, 1), accum=1)
    return torch.cat([p.grad.flatten() for p in trainer.critic.parameters()]), logs


@needs_cpp
def test_compiled_penalty_in_the_step_matches_plain():
    """``Tuning.compile_penalty``: the step's critic gradients and logs with the compiled
    functional penalty equal the eager double backward's (about 20 s of compilation on CPU)."""
    kw = dict(batch_size=2, lpips_weight=0.0, mixed_precision="no", critic_channels=8, critic_layers=2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    recon = (0.8 * x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    results = []
    for compiled in (False, True):
        t = Trainer(load_vae("tiny-random", seed=0), TrainSettings(**kw), "cpu")
        if compiled:  # what speed_up sets when torch_compile is on (here alone, to keep the test short)
            t.penalty = speed.compiled_penalty(speed.COMPILE_OPTIONS)
        results.append(critic_step_grads(t, x, recon))
    (plain, plain_logs), (fast, fast_logs) = results
    assert (fast - plain).norm() <= 1e-5 * plain.norm()  # seen: 3.7e-7 (fp32, CPU)
    for key in ("critic/gp", "critic/loss"):
        assert float(fast_logs[key]) == pytest.approx(float(plain_logs[key]), rel=1e-5), key


@needs_cpp
def test_compiled_penalty_under_bf16_is_as_close_to_fp32_as_the_eager_one():
    """The GPU step runs the penalty under bf16 autocast, with the loss scale a tensor in fp16:
    the compiled form rounds at other points than the eager one, no further from fp32."""
    from furlib.training.losses import PatchCritic, gradient_penalty

    torch.manual_seed(0)
    critic = PatchCritic(2, 8, "pixel_layer")
    real, fake, alpha = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 1, 1, 1)

    def grads(fn, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            gp = fn(critic, real, fake, alpha, torch.tensor(512.0))
        g = torch.autograd.grad(gp, list(critic.parameters()), allow_unused=True, materialize_grads=True)
        return torch.cat([t.flatten() for t in g])

    fp32 = grads(gradient_penalty, False)
    eager, compiled = grads(gradient_penalty, True), grads(speed.compiled_penalty(speed.COMPILE_OPTIONS), True)
    err = lambda g: float((g - fp32).norm() / fp32.norm())  # noqa: E731
    assert err(compiled) <= 1.1 * err(eager)  # seen: 0.0275 vs 0.0276 (eager and compiled 0.0022 apart)


def test_math_attention_is_the_same_function_with_the_same_gradients():
    """``speed.use_math_attention``: diffusers' classic processor (matrix products and a softmax)
    in place of SDPA; the decoder's output and weight gradients agree in fp32, the keys stay."""
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    runs = []
    for math in (False, True):
        vae = load_vae("tiny-random", seed=0)
        if math:
            speed.use_math_attention(vae)
            processors = [m.processor for m in vae.modules() if hasattr(m, "processor")]
            assert processors and all(isinstance(p, AttnProcessor) for p in processors)
        out = vae.decode(z).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in vae.decoder.parameters()])
        runs.append((out.detach(), grads, sorted(vae.state_dict())))
    (out_sdpa, g_sdpa, keys_sdpa), (out_math, g_math, keys_math) = runs
    assert keys_math == keys_sdpa
    assert (out_math - out_sdpa).abs().max() <= 1e-5 * out_sdpa.abs().max()
    assert (g_math - g_sdpa).norm() <= 1e-5 * g_sdpa.norm()


def test_math_attention_only_on_cuda_up_to_512px():
    """Measured on CUDA at 256 and 512 px; larger crops keep SDPA (the scores grow as tokens^2)."""
    tuning, cuda = speed.Tuning(), torch.device("cuda")  # a device name: no GPU needed
    assert speed.wants_math_attention(tuning, TrainSettings(resolution=256), cuda)
    assert speed.wants_math_attention(tuning, TrainSettings(resolution=512), cuda)
    assert not speed.wants_math_attention(tuning, TrainSettings(resolution=520), cuda)
    assert not speed.wants_math_attention(tuning, TrainSettings(resolution=256), torch.device("cpu"))
    assert not speed.wants_math_attention(speed.Tuning(math_attention=False), TrainSettings(resolution=256), cuda)


def backward_inputs(detached: bool) -> list:
    """Shapes of the compiled decoder's backward graph inputs, with the adaptive weight's tap."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from furlib.training.trainer import FeatureTap

    shapes = []

    def backward(gm, _):
        shapes.extend(tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder")
        return make_boxed_func(gm)

    torch._dynamo.reset()
    vae = load_vae("tiny-random", seed=0)
    tap = FeatureTap(vae.decoder.conv_out, detached)
    vae.decoder.compile(backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=backward))
    recon = vae.decode(torch.randn(1, vae.config.latent_channels, 4, 4)).sample
    assert tap.features.requires_grad is not detached
    recon.sum().backward()
    return shapes


def test_detached_tap_takes_no_gradient_in_the_compiled_backward():
    """Kept with its graph, the tapped features are an output of the compiled decoder that needs
    a gradient: every backward gets one more input of their shape (autograd fills it with zeros).
    Detached, the backward takes one input fewer."""
    plain, detached = backward_inputs(False), backward_inputs(True)
    assert len(detached) == len(plain) - 1
    gone = [s for s in set(plain) if plain.count(s) != detached.count(s)]
    assert len(gone) == 1 and len(gone[0]) == 4 and gone[0][0] == 1  # (1, C, H, W): the features


def test_channel_stats_group_norm_is_group_norm():
    """``group_norm.ChannelStatsGroupNorm``: nn.GroupNorm's function and gradients (fp64: to
    rounding, so the same maths; fp32: 1e-6), and the step's decoder gradients and adaptive
    weight with every norm of the VAE swapped (the lever is for compiled CUDA steps; eager here)."""
    import copy

    from furlib.training.group_norm import use_channel_stats_group_norm

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        plain = torch.nn.GroupNorm(8, 32, eps=1e-6).to(dtype)
        with torch.no_grad():
            plain.weight.normal_(generator=gen)
            plain.bias.normal_(generator=gen)
        mine = copy.deepcopy(plain)
        assert use_channel_stats_group_norm(mine) == 1
        x = torch.randn(2, 32, 9, 7, generator=gen, dtype=dtype) * 3 + 5  # an offset: variance cancels
        grads = []
        for norm in (plain, mine):
            xi = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
            y = norm(xi)
            y.backward(torch.cos(3 * x))
            grads.append((y.detach(), xi.grad, norm.weight.grad, norm.bias.grad))
        for a, b in zip(*grads):
            assert (b - a).norm() <= tol * a.norm()
    # the step's decoder gradients (rec + w * gan, fp32), every norm of the VAE swapped as 02 does
    kw = dict(batch_size=2, mixed_precision="no", lpips_weight=0.0, critic_channels=8, critic_layers=2)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    steps = []
    for swap in (False, True):
        t = Trainer(load_vae("tiny-random", seed=0), TrainSettings(**kw), "cpu")
        keys = t.vae.state_dict().keys()
        if swap:
            assert use_channel_stats_group_norm(t.vae) > 0
            assert t.vae.state_dict().keys() == keys
        z = t.encode(x, step_generator(t.device, 0, 0, 0))
        recon, logs = t.decoder_grads(x, z, gan_on=True)
        steps.append((recon, torch.cat([p.grad.flatten() for _, p in t.trainable]), logs["gan/weight"]))
    (recon, grads, weight), (fast_recon, fast_grads, fast_weight) = steps
    assert (fast_recon - recon).abs().max() <= 1e-5 * recon.abs().max()
    assert (fast_grads - grads).norm() <= 1e-5 * grads.norm()
    assert float(fast_weight) == pytest.approx(float(weight), rel=1e-4)


CACHE_PROBE = """
import json, sys
import torch
from torch._dynamo.utils import counters
from furlib.oklab import safe_cbrt
from furlib.training.speed import use_compile_cache
use_compile_cache(sys.argv[1])
f = torch.compile(lambda x: safe_cbrt(x.sin() * 2 + 1).relu().sum())
f(torch.randn(64, requires_grad=True)).backward()
print(json.dumps({**counters["inductor"], **counters["aot_autograd"]}))
"""


def test_compile_cache_reused_by_a_second_process(tmp_path):
    """``speed.use_compile_cache``: a second process (a restarted runtime) loads the first one's
    compiled graphs from the folder instead of building them again: inductor's kernels, and
    AOTAutograd's traced forward and backward of a graph that holds an ``autograd.Function``
    (``oklab.safe_cbrt``), which torch's default settings would trace again."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TORCHINDUCTOR_COMPILE_THREADS="1")  # no pool of compile workers to start: seconds on 2 cores
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "cache")], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit"), first
    if hasattr(importlib.import_module("torch._functorch.config"), "autograd_cache_allow_custom_autograd_functions"):
        assert first.get("autograd_cache_saved", 0) >= 1 and not first.get("autograd_cache_bypass"), first
        assert second.get("autograd_cache_hit", 0) >= 1 and not second.get("autograd_cache_miss"), second
    assert second.get("fxgraph_cache_hit", 0) >= 1 and not second.get("fxgraph_cache_miss"), second
    assert (tmp_path / "cache" / "fxgraph").is_dir()


def test_train_step_parts_summed_per_step_and_variant_keys(monkeypatch):
    """A part that runs twice a step counts once with both times; ``cudnn.*`` keys set
    ``torch.backends.cudnn``; an unknown key fails before any GPU time is spent."""
    ts = bench_module("train_step")
    monkeypatch.setattr(ts, "DEVICE", torch.device("cpu"))
    parts = ts.PartTimes()
    for _ in range(3):
        for _ in range(2):
            with parts.timer("decoder_grads"):
                time.sleep(0.01)
        parts.end_step()
    assert parts.medians()["decoder_grads"] >= 20.0
    monkeypatch.setattr(torch.backends.cudnn, "benchmark_limit", torch.backends.cudnn.benchmark_limit)
    name, overrides = ts.parse_variant("project[compile_penalty=True;mixed_precision='fp16';cudnn.benchmark_limit=0]")
    assert (name, overrides) == ("project", {"compile_penalty": True, "mixed_precision": "fp16"})
    assert torch.backends.cudnn.benchmark_limit == 0
    with pytest.raises(ValueError, match="no_such_knob"):
        ts.parse_variant("project[no_such_knob=1]")
    assert ts.split_variants("plain-bf16,project[inductor_options={'a': 1, 'b': 2};compile_penalty=True],colab-t4") == \
        ["plain-bf16", "project[inductor_options={'a': 1, 'b': 2};compile_penalty=True]", "colab-t4"]


def test_trace_gaps_charges_each_idle_gap_to_the_code_that_launched_the_next_work():
    """benchmarks/trace_gaps.py on a small Chrome trace: two kernels on two streams overlap (one
    busy interval), then a 300 us gap ended by a kernel launched late from trainer.step's
    ``apply_decoder``, then a 50 us gap ended by work queued before it began."""
    tg = bench_module("trace_gaps")

    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}

    events = [
        x("python_function", "furlib/training/trainer.py(147): step", 0, 2000),
        x("python_function", "torch/nn/modules/module.py(1): _call_impl", 10, 100),
        x("python_function", "furlib/training/trainer.py(265): apply_decoder", 900, 500),
        x("cpu_op", "aten::mm", 20, 30), x("cpu_op", "aten::_fused_adamw_", 1000, 300),
        x("cuda_runtime", "cudaLaunchKernel", 25, 5, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 40, 5, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 1100, 10, correlation=3),
        x("cuda_runtime", "cudaLaunchKernel", 1120, 10, correlation=4),
        x("kernel", "gemm", 100, 500, tid=7, correlation=1),
        x("kernel", "other_stream", 300, 510, tid=8, correlation=2),      # busy 100-810
        x("kernel", "adamw", 1110, 100, tid=7, correlation=3),            # gap 300, launched at 1100 > 810
        x("gpu_memcpy", "copy", 1260, 10, tid=7, correlation=4),          # gap 50, launched at 1120 < 1210
    ]
    found = tg.gaps(events, min_us=20)
    assert [(g["us"], g["host_late"], g["cpu_op"], g["frame"], g["next"]) for g in found] == [
        (300, True, "aten::_fused_adamw_", "furlib/training/trainer.py(265): apply_decoder", "adamw"),
        (50, False, "aten::_fused_adamw_", "furlib/training/trainer.py(265): apply_decoder", "copy")]
    text = tg.summary(events, steps=1)
    assert "0.3 ms a step in 2 gaps" in text and "host late for 0.3 ms" in text
    assert tg.gaps(events, min_us=60) == found[:1]
