"""A registry v2 client for pulling: manifests and blobs, anonymous, Bearer token or Basic auth.

Auth follows the registry's lead: a request that comes back 401 carries a `WWW-Authenticate`
challenge. `Bearer realm=...,service=...,scope=...` sends us to the token server (anonymously, or
with Basic credentials when the user has some for that registry) for a token that is then cached per
repository; `Basic` is answered with the credentials directly. Credentials come from the `auths`
section of ~/.docker/config.json (`auth` = base64 "user:password", or `username`/`password`);
credential helpers are not run. Credentials never travel over plain HTTP to a remote host, and
httpx drops the Authorization header when a blob download is redirected to another origin.

Registries on loopback addresses are spoken to over plain HTTP (as Docker treats them as insecure
by default); anything else is HTTPS unless the caller lists it in `plain_http`.

Every response body is bounded: manifests by `MAX_MANIFEST_BYTES`, configs by `MAX_CONFIG_BYTES`,
layers by their descriptor size (itself capped by the caller), error bodies and tokens by 1 MiB.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from banger.errors import BadRequest, BangerError, NotFound, Unauthorized
from banger.images.oci.manifest import ACCEPT, MAX_MANIFEST_BYTES, Descriptor, effective_media_type
from banger.images.oci.reference import DOCKER_HUB, Reference, check_digest
from banger.images.oci.verify import VerifyingReader, check_bytes, sha256_digest

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("banger.images.oci.registry")

SMALL_BODY_MAX = 1 << 20
_CHUNK = 1 << 20
_USER_AGENT = "banger (OCI pull)"
_CHALLENGE = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: str


# ------------------------------------------------------------------------------------- credentials


def docker_config_path(home: Path | None = None) -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    if env and home is None:
        return Path(env) / "config.json"
    return (home if home is not None else Path.home()) / ".docker" / "config.json"


def _registry_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/` -> `host:5000`."""
    text = key.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB if text in _HUB_KEYS else text


def load_docker_credentials(path: Path) -> dict[str, Credentials]:
    """The `auths` entries of a Docker config file by registry; a missing file means none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise BangerError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"{path} is not valid JSON ({exc})", hint="fix or remove it") from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    creds: dict[str, Credentials] = {}
    if not isinstance(auths, dict):
        return creds
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        username = entry.get("username")
        password = entry.get("password")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise BadRequest(f"{path}: the 'auth' of {key!r} is not base64 of user:password") from exc
            if ":" not in decoded:
                raise BadRequest(f"{path}: the 'auth' of {key!r} does not decode to user:password")
            username, password = decoded.split(":", 1)
        if isinstance(username, str) and isinstance(password, str) and username:
            creds[_registry_key(str(key))] = Credentials(username, password)
    return creds


# ----------------------------------------------------------------------------------------- helpers


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for key, value in _CHALLENGE.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return scheme.lower(), params


def _error_detail(resp: httpx.Response) -> str:
    """`CODE: message` from a registry error body (bounded), or the HTTP reason."""
    body = b""
    with contextlib.suppress(Exception):
        for chunk in resp.iter_raw(65536):
            body += chunk
            if len(body) >= 65536:
                break
    with contextlib.suppress(ValueError, AttributeError, TypeError, IndexError, KeyError):
        first = json.loads(body)["errors"][0]
        return f"{first.get('code', '?')}: {first.get('message', '')}".strip()
    return resp.reason_phrase or f"HTTP {resp.status_code}"


def _read_bounded(resp: httpx.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BangerError(f"{what} is {length} bytes, over the cap of {limit} bytes")
    body = bytearray()
    for chunk in resp.iter_raw(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise BangerError(f"{what} exceeds the cap of {limit} bytes; refusing the rest")
    return bytes(body)


# ------------------------------------------------------------------------------------------ client


class RegistryClient:
    def __init__(self, *, credentials: Mapping[str, Credentials] | None = None,
                 plain_http: Collection[str] = (), timeout: float = 60.0) -> None:
        import httpx

        self._credentials = dict(credentials or {})
        self._plain_http = {h.lower() for h in plain_http}
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic: dict[str, str] = {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                                  follow_redirects=True, max_redirects=5,
                                  headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- plumbing

    def _scheme(self, host: str) -> str:
        return "http" if host.lower() in self._plain_http or _is_loopback(host) else "https"

    def _url(self, ref: Reference, kind: str, target: str) -> str:
        return f"{self._scheme(ref.api_host)}://{ref.api_host}/v2/{ref.repository}/{kind}/{target}"

    def _auth_header(self, ref: Reference) -> str | None:
        token = self._tokens.get((ref.api_host, ref.repository))
        if token is not None:
            return f"Bearer {token}"
        return self._basic.get(ref.api_host)

    @contextlib.contextmanager
    def _get(self, ref: Reference, url: str, accept: str | None, what: str) -> Iterator[httpx.Response]:
        """GET `url` (streamed), answering one auth challenge; yields a 200 response or raises."""
        import httpx

        authenticated = False
        while True:
            headers = {"Accept": accept} if accept else {}
            auth = self._auth_header(ref)
            if auth is not None:
                headers["Authorization"] = auth
            try:
                request = self._http.build_request("GET", url, headers=headers)
                resp = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                detail = " ".join(str(exc).split()) or type(exc).__name__
                raise BangerError(f"cannot fetch {what} from {ref.domain}: {detail}") from exc
            try:
                if resp.status_code == 401 and not authenticated:
                    challenge = resp.headers.get("www-authenticate", "")
                    resp.close()
                    self._authenticate(ref, challenge)
                    authenticated = True
                    continue
                if resp.status_code != 200:
                    self._raise_status(ref, resp, what, authenticated)
                yield resp
                return
            finally:
                resp.close()

    def _raise_status(self, ref: Reference, resp: httpx.Response, what: str, authenticated: bool) -> None:
        detail = _error_detail(resp)
        status = resp.status_code
        if status in (401, 403):
            who = self._credentials.get(ref.domain)
            hint = (f"check the credentials of {who.username!r} for {ref.domain} in ~/.docker/config.json"
                    if who is not None else
                    f"log in (`docker login {ref.domain}`; banger reads ~/.docker/config.json) or check the name")
            raise Unauthorized(f"{ref.domain} refused access to {ref.repository} ({status} {detail})", hint=hint)
        if status == 404:
            raise NotFound(f"{what} not found in {ref.domain} ({detail})",
                           hint="check the repository name and tag")
        if status == 429:
            raise BangerError(f"{ref.domain} is rate-limiting pulls ({detail})", hint="wait and retry, or log in")
        raise BangerError(f"{ref.domain} answered {status} for {what} ({detail})")

    # ------------------------------------------------------------------------------------ auth

    def _authenticate(self, ref: Reference, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self._credentials.get(ref.domain)
        if scheme == "basic":
            if creds is None:
                raise Unauthorized(f"{ref.domain} requires a login to pull {ref.repository}",
                                   hint=f"`docker login {ref.domain}` (banger reads ~/.docker/config.json)")
            self._check_secure(ref, f"{self._scheme(ref.api_host)}://{ref.api_host}/", "credentials")
            self._basic[ref.api_host] = creds.basic()
            return
        if scheme != "bearer":
            raise Unauthorized(f"{ref.domain} answered 401 with an unsupported challenge "
                               f"{challenge[:80]!r} (banger speaks Bearer and Basic)")
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Unauthorized(f"{ref.domain} sent a token realm {realm[:120]!r} that is not an http(s) URL")
        scopes = [f"repository:{ref.repository}:pull"]
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        query: list[tuple[str, str]] = [("scope", s) for s in scopes]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        headers = {}
        if creds is not None:
            self._check_secure(ref, realm, "credentials")
            headers["Authorization"] = creds.basic()
            query.append(("account", creds.username))
        self._tokens[(ref.api_host, ref.repository)] = self._fetch_token(ref, realm, query, headers)

    def _check_secure(self, ref: Reference, url: str, what: str) -> None:
        parts = urlsplit(url)
        if parts.scheme == "http" and not (_is_loopback(parts.netloc) or parts.netloc.lower() in self._plain_http):
            raise Unauthorized(f"refusing to send {what} for {ref.domain} over plain HTTP to {parts.netloc}")

    def _fetch_token(self, ref: Reference, realm: str, query: list[tuple[str, str]],
                     headers: dict[str, str]) -> str:
        import httpx

        try:
            with self._http.stream("GET", realm, params=tuple(query), headers=headers) as resp:
                if resp.status_code in (401, 403):
                    raise Unauthorized(
                        f"the token server of {ref.domain} refused "
                        f"{'the credentials' if 'Authorization' in headers else 'an anonymous pull'} "
                        f"for {ref.repository} ({resp.status_code} {_error_detail(resp)})",
                        hint=f"check ~/.docker/config.json, or `docker login {ref.domain}`")
                if resp.status_code != 200:
                    raise BangerError(f"the token server of {ref.domain} answered {resp.status_code} "
                                      f"({_error_detail(resp)})")
                body = _read_bounded(resp, SMALL_BODY_MAX, "token response")
        except httpx.HTTPError as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise BangerError(f"cannot reach the token server of {ref.domain}: {detail}") from exc
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = None
        token = None
        if isinstance(data, dict):
            token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unauthorized(f"the token server of {ref.domain} returned no token")
        return token

    # ------------------------------------------------------------------------------- requests

    def fetch_manifest(self, ref: Reference, target: str | None = None) -> FetchedManifest:
        """The manifest or index at `target` (a tag or digest; default: the reference's own), verified.

        By digest, the body must hash to it. By tag, the registry's Docker-Content-Digest header, when
        sent, must match the body; the body's own hash becomes the digest either way.
        """
        target = target if target is not None else ref.manifest_ref
        by_digest = target.startswith("sha256:")
        what = f"manifest {ref.name}{'@' if by_digest else ':'}{target}"
        url = self._url(ref, "manifests", target)
        with self._get(ref, url, ACCEPT, what) as resp:
            body = _read_bounded(resp, MAX_MANIFEST_BYTES, what)
            header_digest = resp.headers.get("docker-content-digest")
            content_type = resp.headers.get("content-type")
        if by_digest:
            check_bytes(body, check_digest(target), None, what)
            digest = target
        else:
            digest = sha256_digest(body)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise BangerError(f"{what} does not match its digest: the registry says {header_digest}, "
                                  f"the body hashes to {digest}")
        return FetchedManifest(body, effective_media_type(body, content_type), digest)

    def fetch_blob_bytes(self, ref: Reference, desc: Descriptor, what: str) -> bytes:
        """A small blob (an image config), read whole and verified."""
        with self.open_blob(ref, desc, what) as reader:
            data = reader.read()
            reader.finish()
        return data

    @contextlib.contextmanager
    def open_blob(self, ref: Reference, desc: Descriptor, what: str, *,
                  sink: Any = None, on_chunk: Any = None) -> Iterator[VerifyingReader]:
        """Stream a blob; the reader refuses more than `desc.size` bytes and verifies at the end."""
        url = self._url(ref, "blobs", desc.digest)
        started = time.monotonic()
        with self._get(ref, url, None, what) as resp:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > desc.size:
                raise BangerError(f"{what}: the registry announces {length} bytes, "
                                  f"but its descriptor says {desc.size}")
            reader = VerifyingReader(resp.iter_raw(_CHUNK), desc.digest, desc.size, what,
                                     sink=sink, on_chunk=on_chunk)
            yield reader
        log.debug("fetched %s (%d bytes) in %.2fs", what, reader.received, time.monotonic() - started)
