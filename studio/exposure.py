"""Who may reach the studio: loopback by default; a public bind or a share link only with
a password. The CLI checks this before the server starts."""
from __future__ import annotations

import ipaddress
import os
import socket

from studio.errors import StudioError

AUTH_ENV = "LORA_STUDIO_AUTH"
MAX_UPLOAD_BYTES = 2 * 1024**3
#: Lowers (or raises) the upload limit, in MiB: e.g. LORA_STUDIO_MAX_UPLOAD_MB=500.
MAX_UPLOAD_ENV = "LORA_STUDIO_MAX_UPLOAD_MB"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (socket.gaierror, ValueError):
            return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); None when not given."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or len(password) < 8:
        raise StudioError("--auth takes USER:PASSWORD with a password of at least 8 characters "
                          f"(or set {AUTH_ENV}).")
    return user, password


def serving_auth(host: str, *, share: bool, auth: str | None) -> tuple[str, str] | None:
    """The credentials the server must ask for; refuses a public bind or a share link
    without them (a studio reads and writes files on this machine)."""
    credentials = parse_auth(auth or os.environ.get(AUTH_ENV))
    if (share or not is_loopback(host)) and credentials is None:
        where = "a share link" if share else f"{host}"
        raise StudioError(f"Refusing to serve on {where} without a password: anyone who reaches it could read and "
                          f"write files here. Add --auth USER:PASSWORD (or set {AUTH_ENV}), or serve on 127.0.0.1.")
    return credentials


def max_upload_bytes() -> int:
    """The largest file the page accepts: $LORA_STUDIO_MAX_UPLOAD_MB, else MAX_UPLOAD_BYTES."""
    text = os.environ.get(MAX_UPLOAD_ENV, "").strip()
    if not text:
        return MAX_UPLOAD_BYTES
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not 0 < megabytes < 1024**2:  # also refuses nan and inf
        raise StudioError(f"{MAX_UPLOAD_ENV}={text!r} is not a size in MiB; give a positive number such as 500.")
    return max(1, int(megabytes * 1024**2))
