"""The error every data reader raises, so callers catch one class whatever the file or stage."""


class DataError(ValueError):
    """Bad data or data configuration; the message says where and what to change."""
