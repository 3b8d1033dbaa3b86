"""Time the fundus gate: ``check_fundus`` per image on real 400 px photos and on 12 MP phone photos.

Photos are decoded as the app decodes uploads (``open_image``; a 12 MP JPEG is draft-decoded to 500 x 375)
and checked with the upload's size, as ``aisight.web`` does. Each image is checked a few times and its
fastest run kept (the one least disturbed by other work on the machine); the script prints the median
over images in ms per image. Without the fundus-eye4 photos it says so and times generated ones
(``training.synthetic.make_fundus``) instead.

    PYTHONPATH=. .venv/bin/python bench/gate_speed.py [--data ../shared/data/fundus-eye4] [--photos 100]
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aisight.gate import check_fundus  # noqa: E402
from aisight.preprocess import open_image  # noqa: E402
from bench.serve import DEFAULT_DATA, phone_photo  # noqa: E402

Upload = tuple[Image.Image, tuple[int, int]]  # (decoded image, the upload's own size)


def decode(jpeg: bytes) -> Upload:
    """Decode ``jpeg`` as the app does, with the size the app passes the gate."""
    with Image.open(io.BytesIO(jpeg)) as probe:
        size = probe.size
    return open_image(jpeg), size


def real_jpegs(data: Path, count: int) -> list[bytes]:
    """``count`` photos of fundus-eye4, spread over its manifest; empty when the folder is absent."""
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    step = max(1, len(rows) // count)
    return [(data / row["path"]).read_bytes() for row in rows[::step][:count]]


def synthetic_jpegs(count: int) -> list[bytes]:
    """``count`` generated 400 px fundus photos as JPEGs."""
    from training.synthetic import make_fundus

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        make_fundus(rng, diseased=bool(i % 2)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ms_per_image(uploads: list[Upload], repeats: int) -> list[float]:
    """Fastest of ``repeats`` timed checks of each upload, in ms."""
    times = []
    for img, size in uploads:
        check_fundus(img, size)  # warm: per-size caches and work arrays
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            check_fundus(img, size)
            best = min(best, time.perf_counter() - start)
        times.append(1000 * best)
    return times


def report(name: str, uploads: list[Upload], repeats: int) -> None:
    """Print the median (and 90th percentile) ms per image of ``uploads``."""
    times = ms_per_image(uploads, repeats)
    p90 = float(np.percentile(times, 90))
    decoded = sorted({img.size for img, _ in uploads})[:3]
    median = statistics.median(times)
    print(f"{name}: {len(times)} images, decoded {decoded}: median {median:.2f} ms/image, p90 {p90:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="fundus-eye4 folder (with manifest.csv)")
    parser.add_argument("--photos", type=int, default=100, help="real (or generated) 400 px photos to time")
    parser.add_argument("--phones", type=int, default=8, help="12 MP phone photos to make and time")
    parser.add_argument("--repeats", type=int, default=5, help="timed checks per image (the fastest is kept)")
    args = parser.parse_args(argv)

    jpegs = real_jpegs(args.data, args.photos)
    kind = f"real photos from {args.data}"
    if not jpegs:
        print(f"no fundus-eye4 photos at {args.data} (set --data or AISIGHT_DATA): timing generated photos instead")
        jpegs, kind = synthetic_jpegs(args.photos), "generated photos (training.synthetic)"
    report(f"400 px {kind}", [decode(j) for j in jpegs], args.repeats)
    sources = jpegs[:: max(1, len(jpegs) // args.phones)][: args.phones]
    phones = [decode(phone_photo(j, seed)) for seed, j in enumerate(sources)]
    report("12 MP phone photos made from those (bench/serve.py)", phones, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
