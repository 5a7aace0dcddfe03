"""Domain errors, mapped to gRPC codes in one table at the edge (extauthz/errors.py).

VkError
├── InvalidArgument     the caller sent something we will not store or use
├── NotFound            no such key (or not visible to the caller)
└── StoreUnavailable    Redis could not be reached or answered in time
"""

from __future__ import annotations


class VkError(Exception):
    """Base of every domain error; its message is safe to show a caller (never a secret)."""


class InvalidArgument(VkError):
    pass


class NotFound(VkError):
    pass


class StoreUnavailable(VkError):
    pass
