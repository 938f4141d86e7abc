"""Minimal safetensors reader: memory-maps tensors and names truncated files.

The `safetensors` package cannot hand bfloat16 to numpy, so the (tiny, stable)
header format is parsed here and bf16 comes back as ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Returns name -> read-only memory-mapped array for one .safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(path, "file is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointError(path, "file is truncated or not safetensors "
                            f"(header claims {n} bytes)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointError(path, f"corrupt safetensors header: {e}") from e
  header.pop("__metadata__", None)
  data_start = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise CheckpointError(path, f"unsupported dtype {info.get('dtype')}",
                            field=name)
    begin, end = info["data_offsets"]
    if data_start + end > size:
      raise CheckpointError(path, f"file is truncated: tensor ends at byte "
                            f"{data_start + end}, file has {size}", field=name)
    shape = tuple(info["shape"])
    buf = mm[data_start + begin:data_start + end]
    if buf.size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
      raise CheckpointError(path, "byte size does not match shape", field=name)
    out[name] = buf.view(dtype).reshape(shape)
  return out
