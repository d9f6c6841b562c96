#!/usr/bin/env python3
"""The same training step as `cargo bench --bench step`, in PyTorch: a CIFAR ResNet (option-A
shortcuts, as featreplay's), SGD with Nesterov momentum and weight decay, random images, in
fp32. On CUDA, TF32 is off (featreplay computes in plain f32) and cuDNN picks its fastest
algorithms. Prints one line `PYTORCH {"img_per_s": ...}` for scripts/gpu-bench.sh.

  python3 benches/pytorch_step.py --depth 20 --batch 128 --device cuda   # or cpu
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from pytorch_interop import CifarResNet  # noqa: E402  (the model featreplay's names follow)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--input", default="3,32,32", help="C,H,W of the random images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    c, h, w = (int(v) for v in a.input.split(","))
    model = CifarResNet(a.depth, in_channels=c).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x = torch.rand(a.batch, c, h, w, device=dev) * 2 - 1
    y = torch.randint(0, 10, (a.batch,), device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    sync()
    s = (time.perf_counter() - t0) / a.iters
    out = {
        "depth": a.depth,
        "batch": a.batch,
        "input": [c, h, w],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "seconds_per_iteration": s,
        "img_per_s": a.batch / s,
        "torch": torch.__version__,
    }
    print("PYTORCH " + json.dumps(out))


if __name__ == "__main__":
    main()
