"""Seed derivation shared by every process of a cohort."""

import hashlib


def derive_seed(purpose: str, *values: int) -> int:
    """A 63-bit generator seed from a purpose tag and integers.

    Hashes the text ``"purpose:v1:v2..."`` with blake2b, so every process on every platform
    derives the same seed, any integer (negative or huge) is accepted, and different purposes
    (batch order, augmentation, label noise, ...) never share a random stream.
    """
    text = ":".join([purpose, *(str(int(value)) for value in values)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
