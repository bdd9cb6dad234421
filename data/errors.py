"""Errors meant for people: what was wrong, and where (file, row, field)."""
from __future__ import annotations


class IlrError(Exception):
    """Base error of ilr. `where` names the file/row/field; `hint` says what to do about it."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        msg = f"{self.where}: {self.what}" if self.where else self.what
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class DataFormatError(IlrError):
    """The source dataset does not follow its format (missing columns, bad ids, duplicates...)."""


class ImageError(IlrError):
    """An image cannot be used: missing, not an image, corrupt, truncated, too large or too small."""


class ImageTooLarge(ImageError):
    """More pixels (or bytes) than allowed: the service answers 413, not 422."""


class ValidationFailed(IlrError):
    """Great Expectations validation failed; `summary` lists each failing expectation."""

    def __init__(self, summary: str, docs_path: str | None = None):
        self.summary, self.docs_path = summary, docs_path
        hint = f"Data Docs: {docs_path}" if docs_path else None
        super().__init__(f"dataset validation failed; nothing was versioned\n{summary}", hint=hint)


class VersioningError(IlrError):
    """DVC or git could not record or restore a dataset version."""
