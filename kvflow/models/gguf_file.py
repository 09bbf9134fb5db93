"""A GGUF file's metadata and tensor table, read in one pass over the header.

gguf's own `GGUFReader` builds a numpy memmap view for every part of every metadata entry: the default
model's tokenizer (49,152 tokens and 48,900 merges) costs it ~1,000,000 views and 4 s on a 2-core Zen 3,
paid by every process that starts an engine. This reader decodes the header with `struct` from the bytes
and memory-maps only the tensors' data: ~0.1 s for the same file. It offers what kvflow reads: `fields`
(key -> `MetaField` with `.contents()`, as gguf's fields) and `tensors` (gguf's `ReaderTensor`: name,
tensor_type, shape innermost first, n_elements, n_bytes, data_offset and `data` laid out as gguf lays it
out, so `gguf.quants.dequantize` reads it unchanged).
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3, either byte order).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

_SCALARS = {  # value type -> struct code
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_PLAIN_DATA = {  # tensor types gguf exposes element by element; every other type is its bytes
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class MetaField:
    """One metadata entry: its key, its types (ARRAY then the element type, for arrays) and its value."""
    name: str
    types: tuple[GGUFValueType, ...]
    value: Any

    def contents(self) -> Any:
        return self.value


class GGUFFile:
    """Raises ValueError for a file that is not GGUF or whose header is cut short."""

    def __init__(self, path: str):
        self._mmap = np.memmap(path, mode="r")
        self._buf = memoryview(self._mmap)
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError) as e:
            raise ValueError(f"the header is cut short or corrupt ({type(e).__name__}: {e})") from e

    # ---- header --------------------------------------------------------------------------
    def _parse(self) -> None:
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(self._buf[:4])!r}, expected b'GGUF'")
        self._order = "<"
        version = self._unpack("I", 4)
        if version & 0xFFFF == 0:          # written on a big-endian machine
            self._order = ">"
            version = self._unpack("I", 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self._offs = 8
        n_tensors, n_kv = self._next("Q"), self._next("Q")
        self.fields: dict[str, MetaField] = {}
        for _ in range(n_kv):
            key = self._string()
            kind = GGUFValueType(self._next("I"))
            if kind == GGUFValueType.ARRAY:
                item = GGUFValueType(self._next("I"))
                self.fields[key] = MetaField(key, (kind, item), self._array(item, self._next("Q")))
            else:
                self.fields[key] = MetaField(key, (kind,), self._value(kind))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._offs // alignment) * alignment
        self.tensors: list[ReaderTensor] = []
        names = set()
        for name, dims, ggml_type, offset in infos:
            if name in names:
                raise ValueError(f"tensor {name} is listed twice")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, ggml_type, start + offset))

    def _unpack(self, code: str, offs: int):
        return struct.unpack_from(self._order + code, self._buf, offs)[0]

    def _next(self, code: str):
        value = self._unpack(code, self._offs)
        self._offs += struct.calcsize(code)
        return value

    def _string(self) -> str:
        return self._strings(1)[0]

    def _strings(self, n: int) -> list[str]:
        """n strings in a row, each its u64 length then its UTF-8 bytes, in one local loop (a vocabulary's 49k
        tokens and merges were most of a GGUF header's parse: about 5x faster than a call per string)."""
        buf, offs, size = self._buf, self._offs, len(self._buf)
        length = struct.Struct(self._order + "Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(n):
            start = offs + 8
            offs = start + length(buf, start - 8)[0]
            if offs > size:
                raise IndexError(f"a string of {offs - start} bytes runs past the end of the file")
            append(str(buf[start:offs], "utf-8"))
        self._offs = offs
        return out

    def _value(self, kind: GGUFValueType):
        return self._string() if kind == GGUFValueType.STRING else self._next(_SCALARS[kind])

    def _array(self, item: GGUFValueType, n: int) -> list:
        if item == GGUFValueType.STRING:
            return self._strings(n)
        if item == GGUFValueType.ARRAY:
            raise ValueError("nested metadata arrays are not supported")
        code = _SCALARS[item]
        size = struct.calcsize(code) * n
        if self._offs + size > len(self._buf):
            raise IndexError(f"an array of {n} values runs past the end of the file")
        values = list(struct.unpack_from(f"{self._order}{n}{code}", self._buf, self._offs))
        self._offs += size
        return values

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        dims = tuple(self._next("Q") for _ in range(self._next("I")))
        return name, dims, GGMLQuantizationType(self._next("I")), self._next("Q")

    def _tensor(self, name: str, dims: tuple[int, ...], ggml_type: GGMLQuantizationType,
                data_offset: int) -> ReaderTensor:
        n_elements = int(np.prod(dims, dtype=np.int64))
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        shape = tuple(reversed(dims))
        if ggml_type in _PLAIN_DATA:
            dtype = np.dtype(_PLAIN_DATA[ggml_type]).newbyteorder(self._order)
            count = n_elements
        else:
            dtype, count, shape = np.dtype(np.uint8), n_bytes, quant_shape_to_byte_shape(shape, ggml_type)
        end = data_offset + count * dtype.itemsize
        if end > len(self._mmap):
            raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
        data = self._mmap[data_offset:end].view(dtype).reshape(shape)
        return ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, dtype=np.uint64),
                            n_elements=n_elements, n_bytes=n_bytes, data_offset=data_offset, data=data,
                            field=None)
