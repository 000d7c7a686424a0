"""Bearer tokens: ``OMNI_API_TOKEN`` for inference and metadata, ``OMNI_ADMIN_TOKEN`` for the
repository extension (DESIGN.md, Tokens, *contract*).

Each may instead be read from the file that ``OMNI_API_TOKEN_FILE`` / ``OMNI_ADMIN_TOKEN_FILE``
names. A token that is not set leaves its routes open; the admin token also opens the API
routes, and with only an API token set, that token guards the admin routes too, so they are
never more open than inference.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.config import ConfigError

__all__ = ["Access", "Tokens", "authorized"]

_TOKEN = re.compile(r"[\x21-\x7e]+")  # what a client can send in an Authorization header


class Access(enum.Enum):
    """Who may call a route."""

    OPEN = "open"  # health and /metrics
    API = "api"  # inference and metadata
    ADMIN = "admin"  # the repository extension


@dataclass(frozen=True)
class Tokens:
    api: str | None = None
    admin: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Tokens:
        """Read both tokens; ``ConfigError`` names the variable or file that is wrong."""
        return cls(api=_read(environ, "OMNI_API_TOKEN"), admin=_read(environ, "OMNI_ADMIN_TOKEN"))

    def accepted(self, access: Access) -> tuple[bytes, ...]:
        """The ``Authorization`` header values that open a route; none: it is open."""
        if access is Access.OPEN:
            return ()
        if access is Access.ADMIN:
            tokens = [self.admin or self.api]
        else:
            tokens = [self.api, self.admin] if self.api else []
        return tuple(b"Bearer " + t.encode() for t in tokens if t)


def authorized(headers: list[tuple[bytes, bytes]], accepted: tuple[bytes, ...]) -> bool:
    """Whether the request's ``Authorization`` header is one of ``accepted`` (constant time)."""
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == b"bearer " and value[:7] != b"Bearer ":
                value = b"Bearer " + value[7:]  # the scheme is case-insensitive (RFC 7235)
            found = False
            for expected in accepted:
                found |= hmac.compare_digest(value, expected)
            return found
    return False


def _read(environ: Mapping[str, str], variable: str) -> str | None:
    direct = environ.get(variable) or None
    file_variable = f"{variable}_FILE"
    file_name = environ.get(file_variable) or None
    if direct is not None and file_name is not None:
        raise ConfigError(f"{variable} and {file_variable} are both set; set one of them")
    if file_name is not None:
        try:
            token = Path(file_name).read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"{file_variable}: cannot read the token file {file_name}: {reason}"
            ) from None
        where = f"{file_variable} ({file_name})"
        if not token:
            raise ConfigError(f"{where}: the token file is empty")
    elif direct is not None:
        token, where = direct, variable
    else:
        return None
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            f"{where}: the token must be printable ASCII without spaces, as clients send it in "
            "'Authorization: Bearer TOKEN'"
        )
    return token
