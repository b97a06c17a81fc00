"""Encryption at rest for secrets the server must read back (signing secrets, channel tokens).

Fernet (AES-128-CBC + HMAC-SHA256) keyed by ``MAYAK_SECRET_KEY``. Any string works as the master
key; it is stretched with HKDF. Without ``MAYAK_SECRET_KEY`` a key file next to the SQLite
database is created once (``mayak serve`` warns), so the embedded default still encrypts.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mayak.errors import MayakError


class SecretBox:
    def __init__(self, master_key: str):
        if not master_key:
            raise ValueError("master key must not be empty")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"mayak-secrets-v1", info=b"fernet").derive(
            master_key.encode()
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise MayakError(
                "secret_undecryptable",
                "a stored secret cannot be decrypted: is MAYAK_SECRET_KEY the one it was stored with?",
            ) from exc


def load_or_create_key_file(path: Path) -> str:
    """The embedded default's master key: kept in a file readable by the owner only."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key
