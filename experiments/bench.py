"""experiments/bench.py -- time the real SiD loop on a full-size teacher with random weights (no download), and
measure its memory against sid_flow.py's plan.

    python experiments/bench.py --teacher flux-dev [--timed 3] [any sid_flow.py flag]   # writes OUT/bench.json
    python experiments/bench.py --all                  # every preset at its defaults, one process each: the table

It runs sid_flow.distill() itself on the preset's transformer built from its config.json (the copy in assets/hf),
with random tensors in place of the text encoders' output: no weights are downloaded and no token is needed.
On the CPU it counts the activations autograd saves instead of reading the allocator (tests use this).
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sid_flow as sf  # noqa: E402


def random_transformer(src, dtype, device):
    """The teacher's transformer at full size with random weights, made directly on `device` (no download, no CPU
    copy): built on the meta device, allocated, then filled -- matrices N(0, 1/fan_in), vectors 1 (norm scales) or
    0 (biases), buffers N(0, 0.02^2)."""
    net = sf.meta_transformer(src).to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        for b in net.buffers():
            b.normal_(0.0, 0.02)
    return net.requires_grad_(False).eval()


def bench_backbone(config, src, family, device):
    """A Backbone of class `family` (sf.FAMILIES') over a random-weight teacher whose prompts encode to random tensors
    of the shapes (and dtype) the family's text encoders produce. No text encoder, no VAE (an empty module in its
    place): the loop only needs conditioning tensors."""
    teacher = random_transformer(src, sf.teacher_dtype(config), device)
    c, n_text = teacher.config, family.text_tokens

    class RandomText(family):
        def encode(self, prompts):
            g = torch.Generator(device).manual_seed(len(prompts))

            def randn(*shape):
                return torch.randn(shape, generator=g, device=device).to(teacher.dtype)

            B = len(prompts)
            if issubclass(family, sf.SanaBackbone):
                return {"embeds": randn(B, n_text, c.caption_channels), "mask": torch.ones(B, n_text, device=device)}
            if issubclass(family, sf.FluxBackbone):
                self.txt_ids = torch.zeros(n_text, 3, device=device)
            return {"embeds": randn(B, n_text, c.joint_attention_dim), "pooled": randn(B, c.pooled_projection_dim)}

    factor = sf.vae_factor(src, family)
    pipe = type("Components", (), dict(transformer=teacher, vae=torch.nn.Module(), vae_scale_factor=factor))()
    # the native resolution as DiTBackbone takes it, but read without assuming the config has sample_size (FLUX's has
    # none)
    resolution = config.resolution or (c.get("sample_size") or 128) * factor
    backbone = RandomText(pipe, dataclasses.replace(config, resolution=resolution), device)
    backbone.source = src
    return backbone


class SavedActivations:
    """Peak bytes of the tensors autograd saves for backward, seen through saved-tensor hooks: each storage counted
    once while any saved reference to it lives; the networks' own weights excluded (they are counted as weights)."""

    def __init__(self, nets):
        self.weights = {p.untyped_storage().data_ptr() for net in nets for p in net.parameters()}
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.weights or tensor.device.type == "meta":
            return (tensor, None)
        self.refs[key] = self.refs.get(key, 0) + 1
        if self.refs[key] == 1:
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        return (tensor, _Release(self, key))

    def release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda packed: packed[0])


class _Release:
    """Tells the meter when autograd drops a saved tensor (the packed tuple holding this object is freed)."""

    def __init__(self, meter, key):
        self.meter, self.key = meter, key

    def __del__(self):
        self.meter.release(self.key)


def tensor_bytes(tensors):
    """Bytes of distinct storages (local shards under FSDP2; a LoRA base shared by three views counted once)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, by datasheet (SXM parts)


def bench(config, iters, warmup=1):
    """Warm-up + N real SiD iterations through sf.distill() on a full-size random-weight teacher; writes
    OUT/bench.json and prints a table: step time, images/s, measured and planned memory, FLOPs and MFU."""
    src, family = sf.resolve_teacher(config.teacher, configs_only=True)  # family: its Backbone class
    runtime = sf.setup_runtime(config)
    # every iteration trains the last step (k = K, the most expensive: K - 1 roll-out forwards), so that the timed
    # iterations and the one whose FLOPs are counted do the same work
    run = dataclasses.replace(config, iters=warmup + iters, out="", eval_every=1, save_every=0, train_step="last")
    backbone = bench_backbone(run, src, family, runtime.device)
    run = dataclasses.replace(run, resolution=backbone.resolution)
    backbone.set_prompts(sf.DEFAULT_PROMPTS)
    cuda = runtime.device.type == "cuda"
    stamps = []

    def sync():  # a time stamp waits for the GPU's queued work
        if cuda:
            torch.cuda.synchronize(runtime.device)

    def on_eval(step, generator, ema):
        sync()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    res = sf.distill(run, backbone, on_eval=on_eval, runtime=runtime)
    step_s = sorted(b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True))[iters // 2]  # median
    nets = [n for n in (backbone.teacher, res["generator"], res["fake"], res["ema"]) if n is not None]  # ema: if any
    # LoRA: the base holds every adapter, the EMA's too when the run keeps none (made, unused)
    held = nets + [backbone.teacher.base] if isinstance(backbone.teacher, sf.AdapterView) else nets
    optimizers = res["sid"].optimizers.values()
    measured = dict(
        weights=tensor_bytes(p for n in held for p in n.parameters()),
        gradients=tensor_bytes(p.grad for n in nets for p in n.parameters() if p.grad is not None),
        optimizer=tensor_bytes(
            v for opt in optimizers for st in opt.state.values() for k, v in st.items() if k != "step"
        ),
    )
    static = measured["weights"] + measured["gradients"] + measured["optimizer"]
    if cuda:  # the allocator's peak over the timed run (before anything below adds its own)
        measured["total"] = torch.cuda.max_memory_allocated(runtime.device)
        measured["activations"] = measured["total"] - static
    else:  # one more iteration, untimed, with the saved tensors counted
        meter = SavedActivations(nets)
        with meter.hooks():
            res["sid"].iteration(res["step"])
        measured["activations"], measured["total"] = meter.peak, static + meter.peak
    passes_s = sorted(time_passes(run, backbone, res["generator"], res["fake"], sync) for _ in range(3))[1]
    plan = sf.memory_plan(run, sf.meta_transformer(src), family, runtime.world, sf.vae_factor(src, family))
    name = torch.cuda.get_device_name(runtime.device) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    out = dict(
        teacher=config.teacher,
        family=family.pipeline,  # (its pipeline's name: sf.FAMILIES maps it to the class)
        mode=run.mode,
        precision=run.precision,
        grad_checkpointing=run.grad_checkpointing,
        device=name,
        world_size=runtime.world,
        batch_size=run.batch_size,
        grad_accum=run.grad_accum,
        resolution=run.resolution,
        step_s=step_s,
        passes_s=passes_s,
        loop_overhead=step_s / passes_s - 1,
        compile=run.compile,
        images_per_s=run.batch_size * run.grad_accum * runtime.world / step_s,
        measured=measured,
        planned={k: plan[k] for k in measured},
    )
    out["flops_per_step"] = iteration_flops(run, backbone, res["generator"])
    out["evaluation_share"] = evaluation_share(config, backbone.embedded_only)  # at the run's eval_every and iters
    if peak:
        out["mfu"] = out["flops_per_step"] / step_s / peak
    if runtime.rank == 0:
        os.makedirs(config.out, exist_ok=True)
        with open(os.path.join(config.out, "bench.json"), "w") as f:
            json.dump(out, f, indent=1)
        print_bench(out)
    return out


def time_passes(config, backbone, gen, fake, sync):
    """Seconds of the network passes of one iteration (k = K) alone: the same calls, batch sizes, CFG branches and
    gradient routing, without the loop around them (draws, losses, optimizer steps, EMA, logging). Each update draws
    afresh (sid_flow.py, section 6) and runs its config.grad_accum micro-batches: each fake update rolls the generator
    out to its sample, and so does the generator update before its trained step."""
    B, device = config.batch_size, backbone.device
    x, t = torch.randn(B, *backbone.sample_shape, device=device), torch.full((B,), 0.5, device=device)
    cond = backbone.cond_for([i % len(backbone.prompts) for i in range(B)])

    def v(net, x, w):  # a loss's call: CFG scale w inside the guidance interval (D18)
        return backbone.velocity(
            net, x, t, cond, sf.guidance_scale(w, t, config.guidance_t_min, config.guidance_t_max)
        )

    def student(x):  # the generator's call, at the backbone's student guidance (SiD.student)
        return backbone.velocity(gen, x, t, cond, backbone.student_guidance)

    sync()
    t0 = time.perf_counter()
    with sf.autocast(config, device):
        for _ in range(config.fake_updates):
            for _ in range(config.grad_accum):
                with torch.no_grad():
                    for _ in range(config.steps):  # K - 1 roll-out steps, then the fake update's sample
                        student(x)
                v(fake, x, config.guidance_train_fake).float().square().mean().backward()
        for _ in range(config.grad_accum):
            with torch.no_grad():
                for _ in range(config.steps - 1):  # the generator update's own K - 1 roll-out steps
                    student(x)
            x_g = student(x).float()
            loss = (
                v(backbone.teacher, x_g, config.guidance_eval_real).float()
                * v(fake, x_g, config.guidance_eval_fake).float()
            ).mean()
            x_g.backward(torch.autograd.grad(loss, x_g)[0])
    sync()
    for net in (gen, fake):
        net.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def iteration_flops(config, backbone, net):
    """Model FLOPs of one SiD iteration with k = K, from one counted forward of `net` on one sample, for each sample of
    the update's batch (config.grad_accum micro-batches): per fake update K forwards without gradient (K - 1 roll-out
    steps, then its sample), then a forward and a backward (2 forwards' worth: weights and input); the generator
    update's K - 1 roll-out forwards, its step's forward and backward; the teacher's and the fake network's forwards
    with a backward to their input only (1 forward's worth) -- each doubled where two-branch CFG doubles the batch.
    Recomputation under gradient checkpointing is not counted: MFU counts the model's work."""
    x = torch.zeros(1, *backbone.sample_shape, device=backbone.device)
    t = torch.full((1,), 0.5, device=backbone.device)
    with (
        torch.no_grad(),
        sf.autocast(config, backbone.device),
        torch.compiler.set_stance("force_eager"),
        FlopCounterMode(display=False) as counter,
    ):  # (counted on the eager forward: the same model FLOPs)
        backbone.forward(net, x, t, backbone.cond_for([0]), backbone.student_guidance)
    return counter.get_total_flops() * passes(config, backbone.embedded_only) * config.batch_size * config.grad_accum


def passes(config, embedded_only):
    """One iteration's network work (k = K) in forwards of one sample, per sample of the batch (each fake update and
    the generator update draw afresh: sid_flow.py, section 6). `embedded_only`: FLUX's guidance as its embedding
    alone (--embedded-guidance-only), one branch at every scale."""
    interval = config.guidance_t_min > 0 or config.guidance_t_max < 1  # a guidance interval: per-sample scales (D18)

    def branches(w):
        return sf.guidance_branches(w, embedded_only, interval)

    fake_update = config.steps + 3 * branches(
        config.guidance_train_fake
    )  # its K-step sample, then forward and backward
    generator_update = (
        (config.steps - 1) + 3 + 2 * branches(config.guidance_eval_real) + 2 * branches(config.guidance_eval_fake)
    )
    return config.fake_updates * fake_update + generator_update


def evaluation_share(config, embedded_only):
    """The share of a run's network work that its evaluations take, one every config.eval_every iterations: the quality
    number (QUALITY_SIZE K-step student samples, the first four decoded as the preview, and their teacher features,
    sid_flow section 12); plus, once per run, the reference set (REFERENCE_STEPS-step guided teacher samples, the
    teacher's own 4- and 8-step ones and their features), spread over config.iters. All in forwards of one sample, as
    passes() counts; an iteration's batch is config.batch_size x config.grad_accum (one process)."""
    n, per_eval = sf.QUALITY_SIZE, sf.QUALITY_SIZE * (config.steps + 1)
    once = n * (sf.REFERENCE_STEPS + 4 + 8) * sf.guidance_branches(config.guidance_eval_real, embedded_only) + 3 * n
    work = passes(config, embedded_only) * config.batch_size * config.grad_accum
    return (per_eval / config.eval_every + once / config.iters) / work if config.eval_every else 0.0


def print_bench(r):
    gib = 1 << 30
    print(
        f"bench: {r['teacher']} {r['mode']} {r['precision']}{' ckpt' if r['grad_checkpointing'] else ''} on "
        f"{r['world_size']} x {r['device']}, batch {r['batch_size']} x grad-accum {r['grad_accum']} at "
        f"{r['resolution']} px: {r['step_s']:.3f} s/step ({r['passes_s']:.3f} s of network passes alone: loop "
        f"overhead {r['loop_overhead']:+.0%}), {r['images_per_s']:.2f} images/s, "
        f"{r['flops_per_step'] / 1e12:.1f} TFLOP/step, evaluations {r['evaluation_share']:.1%} of the run's FLOPs"
        + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "")
    )
    print(f"  {'GiB':<12}" + "".join(f"{k:>13}" for k in r["measured"]))
    for row in ("measured", "planned"):
        print(f"  {row:<12}" + "".join(f"{r[row][k] / gib:13.3f}" for k in r["measured"]))


def main(argv=None):
    p = sf.Parser(prog="experiments/bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help="a preset, or a diffusers pipeline folder (its transformer config is enough)")
    p.add_argument("--out", help="where bench.json goes [default: out/bench/NAME]")
    p.add_argument("--timed", type=int, default=1, help="iterations timed after one warm-up [default: 1]")
    p.add_argument(
        "--all",
        action="store_true",
        help="bench every preset at its defaults, one process each, and print the README's table",
    )
    p.add_argument(
        "--evaluation-share",
        action="store_true",
        help="print the share of each preset's network work "
        "that its evaluations (quality number, previews) take, from the passes counted: no GPU needed",
    )
    sf.add_config_flags(p, skip=("teacher", "out"), presets={name: name for name in sf.HUB_IDS})
    a = vars(p.parse_args(argv))
    timed, every, share = a.pop("timed"), a.pop("all"), a.pop("evaluation_share")
    if share:
        for name in sf.HUB_IDS:
            config, family = sf.make_config(name), sf.resolve_teacher(name, configs_only=True)[1]
            embedded_only = issubclass(family, sf.FluxBackbone) and config.embedded_guidance_only  # (as FluxBackbone)
            print(
                f"{name:<16} evaluations every {sf.PRESETS[name]['eval_every']} iterations: "
                f"{evaluation_share(config, embedded_only):.2%} of the run's network work"
            )
        return
    if timed < 1:
        raise sf.UserError(f"--timed must be at least 1, got {timed}")
    if every:
        return bench_all(timed, argv)
    if a["teacher"] is None:
        raise sf.UserError("--teacher is required (or --all)")
    a["out"] = a["out"] or os.path.join("out", "bench", sf.slug(a["teacher"]))
    config = sf.make_config(a["teacher"] if a["teacher"] in sf.HUB_IDS else None, **a)
    return bench(config, timed)


def bench_all(timed, argv):
    """Each preset in a process of its own (a fresh GPU allocator), then one markdown table."""
    rows = []
    for name in sf.HUB_IDS:
        out = os.path.join("out", "bench", name)
        r = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--teacher", name, "--timed", str(timed), "--out", out],
            capture_output=True,
            text=True,
        )
        print(r.stdout + r.stderr[-2000:] if r.returncode else r.stdout, flush=True)
        rows.append(json.load(open(os.path.join(out, "bench.json"))) if r.returncode == 0 else dict(teacher=name))
    print(
        "| preset (its defaults) | s/iteration | images/s | TFLOP/iteration | MFU | loop overhead "
        "| peak allocated GiB | planned GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" not in r:
            print(f"| {r['teacher']} | failed | | | | | | |")
            continue
        setting = (
            f"{r['mode']}, ckpt {r['grad_checkpointing']:g}{', compiled' if r['compile'] else ''}, "
            f"b{r['batch_size']} x {r['grad_accum']}, {r['resolution']} px"
        )
        print(
            f"| {r['teacher']} ({setting}) | {r['step_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{r['flops_per_step'] / 1e12:.1f} | {r.get('mfu', 0):.1%} | {r['loop_overhead']:+.0%} | "
            f"{r['measured']['total'] / 2**30:.1f} | "
            f"{r['planned']['total'] / 2**30:.1f} |"
        )
    return rows


if __name__ == "__main__":
    try:
        main()
    except sf.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
