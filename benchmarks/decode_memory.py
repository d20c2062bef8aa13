"""Host memory of one image at ``data.max_pixels``: decode, resize to the model input, full-size labels, label PNG.

    python benchmarks/decode_memory.py [--megapixels 40]

Runs twice in child processes (the first writes the test JPEG) and prints the peak RSS growth of the second.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(path: Path, height: int, width: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from emerdiff_pl.codec import decode_image, encode_label_png
    from emerdiff_pl.inputs import InputPolicy

    torch.set_num_threads(1)
    data = path.read_bytes()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rgb = decode_image(data, height * width)
    InputPolicy(512, "square", 64).resize_image(rgb)
    labels = F.interpolate(torch.zeros(1, 1, 64, 64), size=(height, width), mode="nearest-exact")[0, 0].long()
    encode_label_png(labels.numpy().astype(np.int64))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20  # KiB → GiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, height, width = Path(args.child[0]), int(args.child[1]), int(args.child[2])
        print(
            f"{height}×{width} = {height * width / 1e6:.1f} Mpx: peak RSS growth {measure(path, height, width):.2f} GiB"
        )
        return 0
    import numpy as np
    from PIL import Image

    width = 6400
    height = int(args.megapixels * 1e6 / width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jpg"
        small = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height)).save(path, "JPEG")
        return subprocess.call([sys.executable, __file__, "--child", str(path), str(height), str(width)])


if __name__ == "__main__":
    raise SystemExit(main())
