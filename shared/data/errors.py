"""One exception for bad input data, carrying where the problem is (file, row, column) and why."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, row or column and the reason."""

    def __init__(
        self, message: str, *, path: str | None = None, row: int | None = None, column: str | None = None
    ) -> None:
        where = []
        if path:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.path, self.row, self.column = path, row, column


class TrainingDataError(DataError):
    """A client's data cannot be trained on with these settings (e.g. fewer rows than a batch)."""


class BundleError(DataError):
    """A detector bundle that cannot be written, read or trusted (changed, missing or unlisted files, an
    unsupported format, an unsafe archive); the message names the file and why. The CLI's exit code 2."""
