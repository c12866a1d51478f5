"""Errors raised for bad data."""


class DataError(ValueError):
    """Data that cannot be used as given: a missing or corrupt file, bad shapes, non-finite values."""
