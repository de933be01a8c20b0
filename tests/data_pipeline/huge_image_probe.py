"""Refuses a small-file, huge-dimension PNG through one entry point, in a fresh process, and reports the
peak host memory it took. Run by test_records, test_pipeline and test_builders (a fresh process, because
`ru_maxrss` is a peak over the process's life, which pytest's earlier tests have long raised).

    python huge_image_probe.py records|pipeline|build WORKDIR [TOKENIZER_DIR]

prints one JSON line: {"outcome": what the entry point said, "extra_mb": how far the call raised the peak
resident memory above its level just before the call}.
"""

import json
import os
import resource
import struct
import sys
import zlib

SIDE = 12000  # 144 megapixels: over every default limit, under PIL's own refusal (2 x 89,478,485)


def huge_png(side: int = SIDE) -> bytes:
  """A one-colour 1-bit grayscale PNG of side x side pixels (~18 KB), written without ever holding the pixels.

  PIL holds 1-bit images at a byte per pixel, and RGB at three: decoding this costs 144 MB, converting it
  432 MB more.
  """
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  rows = (b"\x00" + b"\xff" * (side // 8)) * 100  # filter byte "none", then 8 white pixels per byte
  compressor = zlib.compressobj(9)
  body = b"".join(compressor.compress(rows) for _ in range(side // 100)) + compressor.flush()
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(entry: str, workdir: str, tokenizer_dir: str = "") -> None:
  data = huge_png()
  if entry == "records":
    from data_pipeline.records import image_size
    call = lambda: image_size(data, "huge", "image")  # noqa: E731
  elif entry == "pipeline":
    from data_pipeline import pipeline
    from data_pipeline.synthetic import synthetic_emoverse_record
    from data_pipeline.tokenizer import load_tokenizer
    maker = pipeline.ExampleMaker(pipeline.PipelineConfig(tokenizer_dir=tokenizer_dir, seq_len=512),
                                  load_tokenizer(tokenizer_dir))
    features = {**synthetic_emoverse_record(0, 0).to_features(), "id": "huge", "image": data}
    call = lambda: {k: v for k, v in maker.map(features).items() if k in ("outcome", "reason")}  # noqa: E731
  elif entry == "build":
    from PIL import Image

    from data_pipeline.builders import build
    root = os.path.join(workdir, "root")
    os.makedirs(os.path.join(root, "images"))
    with open(os.path.join(root, "images", "huge.png"), "wb") as f:
      f.write(data)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(os.path.join(root, "images", "small.png"))
    items = [{"id": name, "image_path": f"images/{name}.png", "emotion": "awe", "description": "d",
              "background": "b", "attribute": "a", "subject": "s"} for name in ("huge", "small")]
    with open(os.path.join(root, "emoverse_train.json"), "w") as f:
      json.dump(items, f)
    call = lambda: build("emoverse", os.path.join(workdir, "data"), manual_dir=root).skipped  # noqa: E731
  else:
    raise SystemExit(f"unknown entry point {entry!r}")
  before = peak_mb()
  try:
    outcome = call()
  except Exception as error:  # noqa: BLE001 - reported to the test
    outcome = f"{type(error).__name__}: {error}"
  print(json.dumps({"outcome": outcome, "extra_mb": round(peak_mb() - before, 1)}, default=str))


if __name__ == "__main__":
  main(*sys.argv[1:])
