"""Where media may come from: one resolver, with one set of rules, for every media reference of every source.

A sample names its media by a path (relative to its data folder), by an `http(s)://` URL, or carries them inline
(encoded bytes, an audio array, a decoded image). Whatever the format (JSONL, JSON, Parquet, a `datasets` folder or
Hub id, prepared or streamed), each reference goes through `resolve_media` with the run's `MediaPolicy`:

- **Containment.** A path is resolved against the data file's folder, symbolic links included, and refused when
  it leaves that folder (absolute paths, `../` escapes, links pointing out) unless `allow_outside`. A Hub dataset
  has no folder: any local path in it is outside. `{"bytes": ...}` must hold binary data; a string there is
  refused, never read as a path.
- **Remote media** are off unless `allow_remote`. When on, a URL is fetched once, at preparation, and its bytes are
  stored with the prepared rows (training never fetches): with a timeout, a byte cap and the same image / audio
  limits as files, following at most `MAX_REDIRECTS` redirects, and never reaching a loopback, private,
  link-local or otherwise non-public address (a cloud machine's metadata service is one) -- at any hop, checked
  on the address actually connected to -- unless its network is listed in `allowed_networks`.
- **Budgets.** One sample may hold at most `max_sample_pixels` image pixels and `max_sample_audio_seconds` of
  audio (`check_budget`), checked from headers before anything is decoded.
- **At load time** a stored path must still be the file it was (`check_unchanged`): a file replaced by a link to
  somewhere else after preparation is refused.
"""

import http.client
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from .media import MAX_IMAGE_PIXELS, MediaError


REMOTE_SCHEMES = ("http://", "https://")
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaPolicy:
    """The rules media references are held to (from `DataArguments`; the defaults are the safe ones)."""

    allow_outside: bool = False  # local paths outside the data folder
    allow_remote: bool = False  # http(s) URLs
    allowed_networks: tuple[str, ...] = ()  # non-public networks URLs may reach anyway, e.g. ("10.1.0.0/16",)
    remote_timeout: float = 10.0  # seconds per connection attempt and per read, and for a whole download
    remote_max_bytes: int = 32 * 2**20  # largest download
    max_sample_pixels: int = 2 * MAX_IMAGE_PIXELS  # image pixels in one sample (decoded RGB: 3 bytes each)
    max_sample_audio_seconds: float = 3600.0  # audio in one sample

    def __post_init__(self):
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as error:
                raise ValueError(f"remote_media_allowed_networks: {network!r} is not a network ({error})") from None
        for name in ("remote_timeout", "remote_max_bytes", "max_sample_pixels", "max_sample_audio_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"media policy: {name} must be > 0, got {getattr(self, name)}")


def is_remote(source) -> bool:
    return isinstance(source, str) and source.startswith(REMOTE_SCHEMES)


def resolve_media(source, base_dir: str | None, policy: MediaPolicy):
    """`source` as it may be read: a checked absolute path, a URL (when remote media are allowed), or an inline
    source (bytes, `{"bytes": ...}`, an audio array, a decoded image). Raises `MediaError` saying which rule refused
    it. `base_dir` is the data folder (None for a Hub dataset: every local path is then outside it)."""
    if isinstance(source, dict):
        data = source.get("bytes")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise MediaError(
                    f"'bytes' must hold the encoded file, got {type(data).__name__} {data!r:.60} (give a file as "
                    "'path')"
                )
            return {"bytes": bytes(data), "path": None}  # the name `datasets` keeps beside the bytes is never read
        if source.get("array") is not None:
            return source
        return resolve_media(source.get("path"), base_dir, policy)
    if not isinstance(source, str):
        return source  # bytes or a decoded image: no file is read (their type is checked when they are read)
    if not source or "\0" in source:
        raise MediaError(f"media path must be a non-empty string without NUL: {source!r:.80}")
    if is_remote(source):
        if not policy.allow_remote:
            raise MediaError(f"media URL {source:.200} refused: remote media are off (set allow_remote_media)")
        return source
    if "://" in source:
        raise MediaError(f"unsupported URL scheme in {source:.200} (http and https only)")
    if base_dir is None and not policy.allow_outside:
        raise MediaError(
            f"local media path {source!r} in a dataset without a data folder (a Hub dataset) is refused "
            "(set allow_media_outside_data_dir to allow)"
        )
    resolved = os.path.realpath(os.path.join(base_dir or os.getcwd(), source))
    if not policy.allow_outside:
        root = os.path.realpath(base_dir)
        if os.path.commonpath([resolved, root]) != root:
            raise MediaError(
                f"media path {source!r} is outside the data folder {root} (set allow_media_outside_data_dir to allow)"
            )
    return resolved


def check_unchanged(path: str) -> None:
    """Refuse a prepared media path that no longer names the file it named: prepared paths are fully resolved, so a
    symbolic link anywhere in one now means a file or folder was swapped for a link since preparation."""
    if os.path.realpath(path) != os.path.abspath(path):
        raise MediaError(
            f"{path} is now a symbolic link to {os.path.realpath(path)}: refused (it was not when the data was "
            "prepared; prepare the data again if the change is intended)"
        )


def check_budget(image_sizes: list[tuple[int, int]], audio_seconds: list[float], policy: MediaPolicy) -> None:
    """Refuse a sample whose media together are over the policy's per-sample budget (a small file referenced many
    times is decoded as many times)."""
    pixels = sum(width * height for width, height in image_sizes)
    if pixels > policy.max_sample_pixels:
        raise MediaError(
            f"{len(image_sizes)} images of {pixels} pixels in all are over the sample budget of "
            f"{policy.max_sample_pixels} pixels (max_image_pixels_per_sample)"
        )
    seconds = sum(audio_seconds)
    if seconds > policy.max_sample_audio_seconds:
        raise MediaError(
            f"{len(audio_seconds)} audio clips of {seconds:.1f} s in all are over the sample budget of "
            f"{policy.max_sample_audio_seconds:g} s (max_audio_seconds_per_sample)"
        )


def fetch(url: str, policy: MediaPolicy) -> bytes:
    """The body of `url`, fetched under the policy's rules (see the module docstring). Raises `MediaError`."""
    if not policy.allow_remote:
        raise MediaError(f"media URL {url:.200} refused: remote media are off (set allow_remote_media)")
    deadline = time.monotonic() + policy.remote_timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"unsupported media URL {url:.200} (http and https only)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            raise MediaError(f"invalid media URL {url:.200}: {error}") from error
        address = _public_address(parts.hostname, port, policy)
        connection = _PinnedConnection(parts.scheme, parts.hostname, port, address, policy.remote_timeout)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "mmpeft", "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue  # the next hop is checked like the first
            if response.status != 200:
                raise MediaError(f"cannot fetch {url:.200}: HTTP {response.status} {response.reason}")
            return _read_body(response, url, policy, deadline)
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, TLS, malformed
            raise MediaError(f"cannot fetch {url:.200}: {error or type(error).__name__}") from error
        finally:
            connection.close()
    raise MediaError(f"cannot fetch {url:.200}: more than {MAX_REDIRECTS} redirects")


def _public_address(host: str, port: int, policy: MediaPolicy) -> str:
    """An address of `host` that the policy allows connecting to. Every address the name resolves to must be
    allowed: a name that also resolves to a private address is refused rather than raced."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError) as error:
        raise MediaError(f"cannot resolve media host {host}: {error}") from error
    allowed = [ipaddress.ip_network(network, strict=False) for network in policy.allowed_networks]
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        if (not ip.is_global or ip.is_multicast) and not any(ip in network for network in allowed):
            raise MediaError(
                f"media host {host} resolves to {ip}, a loopback, private, link-local or reserved address: refused "
                "(list its network in remote_media_allowed_networks to allow)"
            )
    return sorted(addresses)[0]


class _PinnedConnection:
    """An HTTP(S) connection to `address` for `host`: the address checked is the one connected to (a second DNS
    lookup could answer differently), while TLS still verifies the certificate for `host`."""

    def __init__(self, scheme: str, host: str, port: int, address: str, timeout: float):
        base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        options = {"context": ssl.create_default_context()} if scheme == "https" else {}
        self.connection = base(host, port, timeout=timeout, **options)

        def connect():
            sock = socket.create_connection((address, port), timeout)
            self.connection.sock = options["context"].wrap_socket(sock, server_hostname=host) if options else sock

        self.connection.connect = connect

    def __getattr__(self, name):
        return getattr(self.connection, name)


def _read_body(response, url: str, policy: MediaPolicy, deadline: float) -> bytes:
    cap = policy.remote_max_bytes
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise MediaError(
            f"cannot fetch {url:.200}: {declared} bytes, over the limit of {cap} (remote_media_max_bytes)"
        )
    body = bytearray()
    while chunk := response.read1(min(1 << 16, cap + 1 - len(body))):
        body += chunk
        if len(body) > cap:
            raise MediaError(f"cannot fetch {url:.200}: over the limit of {cap} bytes (remote_media_max_bytes)")
        if time.monotonic() > deadline:
            raise MediaError(f"cannot fetch {url:.200}: not complete within {policy.remote_timeout:g} s")
    if not body:
        raise MediaError(f"cannot fetch {url:.200}: empty response")
    return bytes(body)


__all__ = ["MAX_REDIRECTS", "MediaPolicy", "check_budget", "check_unchanged", "fetch", "is_remote", "resolve_media"]
