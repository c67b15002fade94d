"""The snapshot header's layout (format v2, docs/snapshot-format.md "Header"), written out
independently of pylazymem/snapshot.py so that the tests check the reader against the document,
not against itself. Shared by the format tests and the reliability fuzzer."""
import struct

MAGIC = b"PLMSNAP\x00"
HDR = struct.Struct("<8sIIII17Q")
assert HDR.size == 160
HEADER_FIELDS = ("magic", "version", "header_bytes", "page_size", "flags", "npages", "nstored",
                 "nws", "store_offset", "store_bytes", "map_offset", "map_bytes", "ws_offset",
                 "ws_bytes", "manifest_offset", "manifest_bytes", "sigs_offset", "sigs_bytes",
                 "file_bytes", "tables_xxh3", "sigs_xxh3", "header_xxh3")
# Byte offset of every header field.
FIELD_OFFSET = dict(zip(HEADER_FIELDS, (0, 8, 12, 16, 20) + tuple(range(24, 160, 8))))
FIELD_SIZE = {f: (8 if f == "magic" or FIELD_OFFSET[f] >= 24 else 4) for f in HEADER_FIELDS}
HEADER_CHECKED = 152          # header_xxh3 covers bytes 0..151
SECTIONS = ("store", "map", "ws", "manifest", "sigs")   # in file order

# Version 3 (docs/snapshot-format.md, "Version 3"): an entry index after the store
# (COMPRESSED) and a parent reference (PARENT). tests/test_compress.py builds such files.
HDR3 = struct.Struct("<8sIIII20Q")
assert HDR3.size == 184
HEADER3_FIELDS = ("npages", "nstored", "nws", "store_offset", "store_bytes", "index_offset",
                  "index_bytes", "map_offset", "map_bytes", "ws_offset", "ws_bytes",
                  "manifest_offset", "manifest_bytes", "sigs_offset", "sigs_bytes", "file_bytes",
                  "parent_id", "tables_xxh3", "sigs_xxh3", "header_xxh3")
HEADER3_CHECKED = 176         # header_xxh3 covers bytes 0..175
SECTIONS3 = ("store", "index", "map", "ws", "manifest", "sigs")
FLAG_COMPRESSED, FLAG_PARENT = 1, 2
CODEC_RAW, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
PARENT_ENTRY = 0xFFFFFFFF
