#!/usr/bin/env python3
r"""featreplay <-> PyTorch: the same CIFAR ResNet on both sides, checkpoints in both directions.

Run by hand (never in CI). Needs only torch, safetensors and numpy, installed in a virtual
environment outside the repository, for example:

    python3 -m venv ~/venv-torch
    ~/venv-torch/bin/pip install torch safetensors numpy

The model is the option-A CIFAR ResNet most PyTorch code uses (the layout of
akamaster/pytorch_resnet_cifar10): its `state_dict()` names are exactly the tensor names of
a featreplay checkpoint. The embedded data (the Fashion-MNIST subset featreplay ships) is
read from this repository's `assets/fashion-mnist-mini/`, so the script runs from anywhere.

Commands:

    # The state_dict keys, shapes and dtypes of the CIFAR-10 ResNet-20 (3x32x32, 10
    # classes), which a Rust test compares with featreplay's checkpoint tensors.
    python examples/pytorch_interop.py fixture [--out tests/fixtures/pytorch_resnet20_state_dict.json]

    # Load a featreplay checkpoint into PyTorch (load_state_dict(strict=True), no renames),
    # check every value, and evaluate it on the run's test set with the stored
    # normalisation; --featreplay also runs `featreplay eval RUN_DIR` for comparison.
    python examples/pytorch_interop.py to-pytorch RUN_DIR_OR_FILE [--featreplay target/release/featreplay]

    # Train a 1-channel ResNet-20 briefly in PyTorch on the embedded training images and
    # save its state_dict as safetensors; prints (with --featreplay, runs) the
    # `featreplay eval` command that evaluates the file.
    python examples/pytorch_interop.py from-pytorch OUT.safetensors [--epochs 1] [--seed 0] \
        [--featreplay target/release/featreplay]
"""

import argparse
import gzip
import json
import math
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO / "assets" / "fashion-mnist-mini"
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "pytorch_resnet20_state_dict.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
METADATA_KEY = "featreplay"
FORMAT_VERSION = 2
# Tensors of a featreplay checkpoint that are not part of the model.
TRAINING_PREFIXES = ("optimizer.", "training.")
EVAL_BATCH = 256
# from-pytorch's training: SGD with Nesterov momentum, as featreplay trains.
TRAIN_BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# --- the model -----------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Option-A shortcut: keep every second row and column, then add `pad` zero channels on
    each side of the channel dimension. It has no parameters, so no state_dict keys."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, plus the input through the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShortcutA((out_channels - in_channels) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2: a 3x3 stem of 16 channels, three stages of n basic
    blocks (16, 32 and 64 channels; stride 2 at the start of stages 2 and 3), global average
    pooling and a linear classifier."""

    def __init__(self, depth: int, in_channels: int = 3, classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth {depth} is not 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# --- data ----------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """A gzip IDX file of unsigned bytes (magic 00 00 08 ndims, big-endian u32 dims, data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
    ndims = raw[3]
    header = 4 + 4 * ndims
    dims = struct.unpack(f">{ndims}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise SystemExit(f"{path}: {data.size} bytes of data but the header declares {dims}")
    return data.reshape(dims)


def load_embedded(split: str) -> tuple[np.ndarray, torch.Tensor]:
    """The embedded Fashion-MNIST subset: `train` (4000 images) or `t10k` (1000 test
    images), as uint8 images [N, 1, 28, 28] and int64 labels [N]."""
    images = read_idx(EMBEDDED_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(EMBEDDED_DIR / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise SystemExit(f"{EMBEDDED_DIR}: {len(images)} {split} images but {len(labels)} labels")
    return images[:, None, :, :], torch.from_numpy(labels.astype(np.int64))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and population standard deviation of uint8 images [N, C, H, W] on
    the [0, 1] scale, rounded to float32 as featreplay stores them. Sums are exact integers
    and the division is done once in float64; a constant channel gets std 1."""
    channels = images.shape[1]
    pixels = images.transpose(1, 0, 2, 3).reshape(channels, -1).astype(np.uint64)
    count = pixels.shape[1]
    mean, std = [], []
    for c in range(channels):
        s = int(pixels[c].sum())
        q = int((pixels[c] * pixels[c]).sum())
        sd = math.sqrt(count * q - s * s) / count / 255.0
        mean.append(float(np.float32(s / count / 255.0)))
        std.append(float(np.float32(sd)) if sd > 0 else 1.0)
    return mean, std


def normalise(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """`(pixel / 255 - mean[c]) / std[c]` as float32 NCHW, computed in float64 and rounded
    once (featreplay's lookup table gives the same values)."""
    m = np.asarray(mean, dtype=np.float32).astype(np.float64)[:, None]
    s = np.asarray(std, dtype=np.float32).astype(np.float64)[:, None]
    lut = ((np.arange(256, dtype=np.float64)[None, :] / 255.0 - m) / s).astype(np.float32)
    channel = np.arange(images.shape[1])[None, :, None, None]
    return torch.from_numpy(lut[channel, images])


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4 pixels of zero padding and random horizontal flip, on uint8
    images (so padding is black, as in featreplay and torchvision)."""
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, size=(2, n))
    out = np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    return out


# --- evaluation and comparison -------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Mean cross-entropy and the number of images whose argmax logit is the label."""
    model.eval()
    logits = torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    loss = F.cross_entropy(logits, labels).item()
    correct = int((logits.argmax(dim=1) == labels).sum())
    return loss, correct


def report(loss: float, correct: int, n: int) -> tuple[float, float]:
    """Prints the PyTorch line and returns (loss, top-1 %)."""
    top1 = 100.0 * correct / n
    print(f"pytorch    : loss {loss:.6f}  top-1 {top1:.2f}% ({correct}/{n} test images)")
    return loss, top1


def format_f32(value: float) -> str:
    """The shortest decimal that reads back as the same float32."""
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def compare_with_featreplay(command: list[str], ours: tuple[float, float]) -> int:
    """Runs a `featreplay eval` command, prints its line under ours and the differences;
    returns its exit code."""
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.strip().splitlines():
        print(f"featreplay : {line}")
    if done.returncode != 0:
        print(f"featreplay : exited with {done.returncode}:\n{done.stderr.strip()}", flush=True)
        return done.returncode
    found = re.search(r"loss (\S+)\s+top-1 (\S+)%", done.stdout)
    if found:
        loss, top1 = float(found[1]), float(found[2])
        print(f"difference : loss {ours[0] - loss:+.6f}  top-1 {ours[1] - top1:+.2f} points (pytorch minus featreplay)")
    return 0


def check_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    """Exits unless `actual` has exactly the names of `expected` and, for each, the same
    dtype, shape and bytes (so NaN payloads and signed zeros count too)."""
    if expected.keys() != actual.keys():
        missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
        raise SystemExit(f"{what}: missing {missing}, unexpected {extra}")
    for name, want in expected.items():
        got = actual[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise SystemExit(
                f"{what}: {name} is {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"
            )
        if got.contiguous().numpy().tobytes() != want.contiguous().numpy().tobytes():
            raise SystemExit(f"{what}: {name} differs")


# --- commands ------------------------------------------------------------------------------


def cmd_fixture(args: argparse.Namespace) -> int:
    """Writes the CIFAR-10 ResNet-20's state_dict names, shapes and dtypes, in order."""
    model = CifarResNet(20, in_channels=3, classes=10)
    tensors = [
        {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    ]
    head = {"model": "resnet20", "input": [3, 32, 32], "classes": 10, "torch_version": torch.__version__}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = ",\n".join(f"    {json.dumps(t)}" for t in tensors)
    text = "{\n" + "\n".join(lines) + '\n  "tensors": [\n' + body + "\n  ]\n}\n"
    json.loads(text)  # the hand-made layout (one tensor a line) must still be valid JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"{args.out}: {len(tensors)} tensors of resnet20 (torch {torch.__version__})")
    return 0


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the parsed `featreplay` metadata of a checkpoint file."""
    with safe_open(path, "pt") as f:
        header = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if METADATA_KEY not in header:
        raise SystemExit(
            f"{path} has no featreplay metadata: for a plain PyTorch state_dict use "
            "`featreplay eval FILE --arch resnet --depth D --dataset embedded --mean M --std S`"
        )
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        print(f"warning: {path} has format_version {version}; this script follows {FORMAT_VERSION}", file=sys.stderr)
    return tensors, meta


def embedded_test_set(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test images (the first `config.test_subset`, or all), normalised with the
    checkpoint's statistics, and their labels."""
    config, data = meta["config"], meta["extra"]["data"]
    if config.get("dataset") != "embedded":
        raise SystemExit(f"the run used dataset {config.get('dataset')!r}; this script has only the embedded one")
    images, labels = load_embedded("t10k")
    if list(images.shape[1:]) != list(data["input"]):
        raise SystemExit(f"the checkpoint's input is {data['input']}, the embedded images' {list(images.shape[1:])}")
    n = config.get("test_subset") or len(images)
    if n > len(images):
        raise SystemExit(f"test_subset {n}: the embedded test set has {len(images)} images")
    if data.get("test_images", n) != n:
        raise SystemExit(f"the checkpoint says it was tested on {data['test_images']} images, not {n}")
    return normalise(images[:n], data["mean"], data["std"]), labels[:n]


def cmd_to_pytorch(args: argparse.Namespace) -> int:
    """Loads a featreplay checkpoint into the PyTorch model and evaluates it."""
    path = args.checkpoint / CHECKPOINT_FILE if args.checkpoint.is_dir() else args.checkpoint
    tensors, meta = read_checkpoint(path)
    config, data = meta["config"], meta["extra"]["data"]
    if config.get("arch") != "resnet":
        raise SystemExit(f"arch {config.get('arch')!r}: this script builds the basic-block `resnet` only")
    model = CifarResNet(config["depth"], in_channels=data["input"][0], classes=data["classes"])
    state = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIXES)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"{path}: load_state_dict(strict=True) failed: {e}")
    # strict=True alone lets a missing num_batches_tracked through (BatchNorm fills in 0).
    check_identical(model.state_dict(), state, f"{path}, against the loaded model")
    print(
        f"{path}: resnet{config['depth']} {data['input']} {data['classes']} classes, epoch {meta['epoch']}, "
        f"format_version {meta.get('format_version')}"
    )
    print(
        f"loaded {len(state)} model tensors (strict, values identical), "
        f"ignored {len(tensors) - len(state)} under {'/'.join(TRAINING_PREFIXES)}"
    )
    x, labels = embedded_test_set(meta)
    ours = report(*evaluate(model, x, labels), len(labels))
    if args.featreplay:
        return compare_with_featreplay([str(args.featreplay), "eval", str(args.checkpoint)], ours)
    return 0


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray,
    labels: torch.Tensor,
    normalisation: tuple[list[float], list[float]],
    rng: np.random.Generator,
) -> tuple[float, float]:
    """One epoch over shuffled, augmented batches (the last one partial); the mean loss and
    top-1 % of the training batches."""
    model.train()
    total_loss, correct = 0.0, 0
    order = rng.permutation(len(images))
    for start in range(0, len(order), TRAIN_BATCH):
        idx = order[start : start + TRAIN_BATCH]
        x = normalise(augment(images[idx], rng), *normalisation)
        y = labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(dim=1) == y).sum())
    return total_loss / len(images), 100.0 * correct / len(images)


def cmd_from_pytorch(args: argparse.Namespace) -> int:
    """Trains a 1-channel ResNet-20 in PyTorch and saves its state_dict as safetensors."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_images, train_labels = load_embedded("train")
    test_images, test_labels = load_embedded("t10k")
    mean, std = channel_stats(train_images)
    model = CifarResNet(20, in_channels=1, classes=10)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    print(f"resnet20 [1, 28, 28]: {len(train_images)} training images, mean {mean} std {std}")
    for epoch in range(1, args.epochs + 1):
        loss, top1 = train_epoch(model, optimizer, train_images, train_labels, (mean, std), rng)
        print(f"epoch {epoch}: train loss {loss:.4f} top-1 {top1:.2f}%")
    ours = report(*evaluate(model, normalise(test_images, mean, std), test_labels), len(test_labels))
    save_file(model.state_dict(), str(args.out))
    check_identical(model.state_dict(), load_file(str(args.out)), f"{args.out} read back")
    print(f"wrote {args.out} ({len(model.state_dict())} tensors, no metadata)")
    command = [str(args.featreplay or "featreplay"), "eval", str(args.out), "--arch", "resnet", "--depth", "20"]
    command += ["--dataset", "embedded", "--mean", ",".join(map(format_f32, mean))]
    command += ["--std", ",".join(map(format_f32, std))]
    print(f"command    : {shlex.join(command)}")
    if args.featreplay:
        return compare_with_featreplay(command, ours)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixture", help="write the ResNet-20 state_dict names, shapes and dtypes")
    p.add_argument("--out", type=Path, default=DEFAULT_FIXTURE)
    p.set_defaults(run=cmd_fixture)

    p = sub.add_parser("to-pytorch", help="load and evaluate a featreplay checkpoint in PyTorch")
    p.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_FILE")
    p.add_argument("--featreplay", type=Path, metavar="BINARY", help="also run `BINARY eval RUN_DIR_OR_FILE`")
    p.set_defaults(run=cmd_to_pytorch)

    p = sub.add_parser("from-pytorch", help="train in PyTorch and save a state_dict for featreplay")
    p.add_argument("out", type=Path, metavar="OUT.safetensors")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--featreplay", type=Path, metavar="BINARY", help="also run the printed `featreplay eval` command")
    p.set_defaults(run=cmd_from_pytorch)

    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
