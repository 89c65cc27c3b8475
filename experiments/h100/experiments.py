"""Device experiment: tune the Triton split-KV decode; try stream orders/priorities for the streams mode."""
import itertools, json, os, sys, time
import torch
from hhbench.kernels import registry, triton_decode, hybrid
from hhbench.measure.timing import time_callable, TimingPolicy
from hhbench.measure.env import measure_peaks

OUT = os.environ["OUT"]
dev = torch.device("cuda")
part = sys.argv[1]
if part == "flush":
    from hhbench.measure import timing
    flash = registry.get("sdpa-flash", registry.FA)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    buf = torch.zeros(2 * l2 // 4, dtype=torch.int32, device=dev)
    def zero(device): buf.zero_()
    def read(device): buf.sum()
    def zero_read(device): buf.zero_(); buf.sum()
    def none(device): pass
    for heads, T in ((4, 32768), (4, 131072), (32, 32768)):
        q = torch.randn(1, 1, heads, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, heads, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        kv = 2 * T * heads * 128 * 2
        for fname, f in (("zero", zero), ("read", read), ("zero+read", zero_read), ("none", none)):
            timing._L2Flusher.flush = staticmethod(f)
            for bname, fn in (("flash", lambda: flash.decode(q, k, v)), ("triton", lambda: triton_decode.split_kv_decode(q, k, v, sms, 256)),
                              ("read-all", lambda: (k.sum(), v.sum()))):
                t = time_callable(fn, dev, TimingPolicy(warmup_ms=20, target_ms=200, min_reps=30, max_reps=300, graph=True))
                print(f"{heads} {T} flush={fname:9s} {bname:8s} {t.median_ms*1e3:7.1f} us [{t.percentile(.1)*1e3:.1f}, {t.percentile(.9)*1e3:.1f}]  {kv / t.median_ms / 1e6:6.0f} GB/s", flush=True)
elif part == "graphs":
    from hhbench.plan.grid import grid_points
    from hhbench.bench.workloads import build
    for fa in ("sdpa-cudnn", "sdpa-flash"):
        for batch, ctx in ((4, "4k"), (1, "16k")):
            res = {}
            for mode in ("sequential", "streams"):
                (point,) = grid_points({"models": "h32d128", "layouts": "head", "ratios": "1:1", "contexts": ctx, "batch": batch,
                                        "passes": "prefill", "scopes": "kernel", "modes": mode, "parts": True, "fa_backend": fa}, "cuda")
                w = build(point, dev)
                for graph in (False, True):
                    pol = TimingPolicy(warmup_ms=50, target_ms=300, min_reps=8, max_reps=100, graph=graph)
                    t = time_callable(w.run, dev, pol)
                    res[(mode, graph)] = t.median_ms
                    extra = ""
                    if mode == "sequential":
                        parts = {n: time_callable(f, dev, pol).median_ms for n, f in w.parts.items()}
                        extra = " parts " + " ".join(f"{n}={v:.3f}" for n, v in parts.items())
                    print(f"{fa} B={batch} {ctx} {mode:10s} graph={graph!s:5s} {t.median_ms:.3f} ms [{t.percentile(.1):.3f}, {t.percentile(.9):.3f}]{extra}", flush=True)
                del w
            for graph in (False, True):
                print(f"  -> {fa} B={batch} {ctx} graph={graph}: streams speedup {res[('sequential', graph)] / res[('streams', graph)]:.3f}", flush=True)
elif part == "profile":
    from torch.profiler import profile, ProfilerActivity
    from hhbench.plan.grid import grid_points
    from hhbench.bench.workloads import build
    for layout, ratio in (("head", "7:1"), ("layer", "3:1")):
        (point,) = grid_points({"models": "qwen3-1.7b", "layouts": layout, "ratios": ratio, "contexts": "16k",
                                "passes": "decode", "scopes": "layer"}, "cuda")
        w = build(point, dev)
        pol = TimingPolicy(warmup_ms=50, target_ms=300, min_reps=8, max_reps=200, graph=True)
        t = time_callable(w.run, dev, pol)
        print(f"{layout}:{ratio} graph {t.median_ms*1e3:.1f} us per run of {w.layers_per_run} layers", flush=True)
        for _ in range(3):
            w.run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                w.run()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total_n = sum(e.count for e in events) / 10
        total_t = sum(e.self_device_time_total for e in events) / 10
        print(f"  {total_n:.0f} kernels per run, {total_t:.1f} us of kernel time per run", flush=True)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
            print(f"  {e.count/10:5.1f} x {e.self_device_time_total/max(e.count,1):7.2f} us  {e.key[:110]}", flush=True)
        del w
elif part == "fused":
    copy = measure_peaks()["copy_gbps"]
    print("copy", copy, flush=True)
    policy = TimingPolicy(warmup_ms=20, target_ms=150, min_reps=30, max_reps=300, graph=True)
    math_ = registry.get("sdpa-math", registry.FA)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    records = []
    for heads, T, group in ((4, 32768, 1), (4, 65536, 1), (4, 131072, 1), (8, 32768, 1), (8, 65536, 1), (8, 131072, 1), (32, 32768, 1), (32, 131072, 1), (8, 32768, 2), (1, 32768, 4)):
        q = torch.randn(1, 1, heads * group, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, heads, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        ref = math_.decode(q.float(), k.float(), v.float())
        kv = 2 * T * heads * 128 * 2
        line = []
        for name, cfg, mult in (("two", dict(block_n=64, num_warps=4, num_stages=3), 1), ("fused", dict(block_n=64, num_warps=4, num_stages=3, fused=True), 1),
                                ("fused-w8", dict(block_n=64, num_warps=8, num_stages=3, fused=True), 1), ("fused-n128", dict(block_n=128, num_warps=4, num_stages=3, fused=True), 1),
                                ("fused-x2", dict(block_n=64, num_warps=4, num_stages=3, fused=True), 2)):
            fn = lambda: triton_decode.split_kv_decode(q, k, v, mult * sms, 256, cfg)
            errs = [float((fn().float() - ref).norm() / ref.norm()) for _ in range(50)]
            t = time_callable(fn, dev, policy)
            records.append(dict(heads=heads, T=T, group=group, cfg=name, max_err=max(errs), ms=t.median_ms, p10=t.percentile(.1), p90=t.percentile(.9), of_copy=kv / (t.median_ms * 1e-3) / 1e9 / copy))
            line.append(f"{name} {t.median_ms*1e3:.1f}us [{t.percentile(.1)*1e3:.1f},{t.percentile(.9)*1e3:.1f}] {kv / (t.median_ms * 1e-3) / 1e9 / copy:.3f} err{max(errs):.1e}")
        print(heads, T, group, " | ".join(line), flush=True)
    json.dump(dict(copy_gbps=copy, records=records), open(f"{OUT}/fused.json", "w"))
elif part == "decode":
    peaks = measure_peaks()
    copy = peaks["copy_gbps"]
    print("peaks", peaks, flush=True)
    policy = TimingPolicy(warmup_ms=20, target_ms=100, min_reps=20, max_reps=200, graph=True)
    flash = registry.get("sdpa-flash", registry.FA)
    math_ = registry.get("sdpa-math", registry.FA)
    records = []
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for heads, T in itertools.product((4, 8, 32), (32768, 65536, 131072)):
        q = torch.randn(1, 1, heads, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, heads, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        ref = math_.decode(q.float(), k.float(), v.float())
        kv = 2 * T * heads * 128 * 2
        t = time_callable(lambda: flash.decode(q, k, v), dev, policy)
        records.append(dict(heads=heads, T=T, cfg="sdpa-flash", ms=t.median_ms, p10=t.percentile(.1), p90=t.percentile(.9), of_copy=kv / (t.median_ms * 1e-3) / 1e9 / copy))
        for block_n, warps, stages, mult in itertools.product((64, 128), (4, 8), (2, 3, 4), (1, 2, 4)):
            cfg = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            fn = lambda: triton_decode.split_kv_decode(q, k, v, mult * sms, 256, cfg)
            try:
                out = fn()
                err = float((out.float() - ref).norm() / ref.norm())
                t = time_callable(fn, dev, policy)
            except Exception as exc:
                print("fail", heads, T, cfg, mult, repr(exc)[:200], flush=True)
                continue
            records.append(dict(heads=heads, T=T, cfg=f"n{block_n}w{warps}s{stages}x{mult}", err=err, ms=t.median_ms, p10=t.percentile(.1), p90=t.percentile(.9), of_copy=kv / (t.median_ms * 1e-3) / 1e9 / copy))
        best = sorted([r for r in records if r["heads"] == heads and r["T"] == T], key=lambda r: r["ms"])[:6]
        print(heads, T, [(r["cfg"], round(r["ms"] * 1e3, 1), round(r["of_copy"], 3), r.get("err")) for r in best], flush=True)
    json.dump(dict(peaks=peaks, records=records), open(f"{OUT}/decode_tuning.json", "w"))
    # configs ranked by their worst ratio to the best over all shapes
    import collections
    best_ms = collections.defaultdict(lambda: 1e9)
    for r in records:
        best_ms[(r["heads"], r["T"])] = min(best_ms[(r["heads"], r["T"])], r["ms"])
    worst = collections.defaultdict(float)
    for r in records:
        worst[r["cfg"]] = max(worst[r["cfg"]], r["ms"] / best_ms[(r["heads"], r["T"])])
    print(sorted(worst.items(), key=lambda x: x[1])[:10])
else:
    from hhbench.cli.app import app, _register_commands
    _register_commands()
    variants = {"gdn-first": ("gdn", 0, "side"), "fa-first": ("fa", 0, "side"), "fa-first-gdnhi": ("fa", -1, "side"),
                "gdn-first-hi": ("gdn", -1, "side"), "fa-side-hi": ("fa", -1, "fa-side")}
    streams = {}
    def make(first, priority, where):
        def run_both(fa_fn, gdn_fn, mode, device):
            if mode != hybrid.STREAMS or device.type != "cuda":
                return fa_fn(), gdn_fn()
            main = torch.cuda.current_stream(device)
            side = streams.setdefault((priority, where), torch.cuda.Stream(device=device, priority=priority))
            side.wait_stream(main)
            on_side, on_main = (gdn_fn, fa_fn) if where == "side" else (fa_fn, gdn_fn)
            side_first = (first == "gdn") == (where == "side")
            if side_first:
                with torch.cuda.stream(side):
                    s_out = on_side()
                m_out = on_main()
            else:
                m_out = on_main()
                with torch.cuda.stream(side):
                    s_out = on_side()
            main.wait_stream(side)
            for tensor in s_out if isinstance(s_out, tuple) else (s_out,):
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(main)
            return (s_out, m_out) if where == "fa-side" else (m_out, s_out)
        return run_both
    for name, spec in variants.items():
        hybrid.run_both = make(*spec)
        for args in (["--ratios", "1:1", "--contexts", "4k", "--batch", "4", "--passes", "prefill"],
                     ["--ratios", "1:1", "--contexts", "16k", "--batch", "1", "--passes", "prefill"],
                     ["--ratios", "7:1,3:1", "--contexts", "128k", "--passes", "decode"]):
            try:
                app(["sweep", "--models", "h32d128", "--layouts", "head", "--scopes", "kernel", "--mode", "sequential,streams",
                     "--run", f"streams-{name}", "--out", OUT, *args], standalone_mode=False)
            except SystemExit:
                pass
        rows = [json.loads(l) for l in open(f"{OUT}/streams-{name}/rows.jsonl")]
        for r in rows:
            print(name, r["variant"], r["context"], r["batch"], r["pass"], r["mode"], r["status"], round(r.get("latency_ms") or -1, 4), round(r.get("latency_p10_ms") or -1, 4), round(r.get("latency_p90_ms") or -1, 4), flush=True)
