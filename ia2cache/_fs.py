"""Moved to :mod:`ia2cache.store.locations` (one :class:`~ia2cache.store.Location` type for local and
remote stores); these names stay importable from here for code not yet updated."""

from ia2cache.store.locations import RemotePath, is_remote_failure, is_url, location, remote_failure_message

__all__ = ["RemotePath", "is_remote_failure", "is_url", "location", "remote_failure_message"]
