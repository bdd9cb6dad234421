"""Readers: each turns a dataset in its published layout into a manifest (see data.manifest).

A reader returns a `Source`: the manifest rows plus `src`, the absolute path of each image file,
which ingestion copies into the versioned store. Readers only check structure (files, columns, ids,
labels); pixels are checked by validation.
"""
from __future__ import annotations

from data.errors import DataFormatError
from data.formats.common import Source

__all__ = ["Source", "get_reader"]


def get_reader(fmt: str):
    from data.formats import folder, gldv2, met, roxford, sop

    readers = {"gldv2": gldv2.read, "roxford": roxford.read, "folder": folder.read,
               "met": met.read, "sop": sop.read}
    if fmt not in readers:
        raise DataFormatError(f"unknown format {fmt!r}; one of {sorted(readers) + ['synthetic']}")
    return readers[fmt]
