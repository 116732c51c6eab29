"""Authentication: API keys (or mTLS client certificates) mapped to tenants.

The keys file (`--api-keys-file`) is JSON and holds SHA-256 digests, never keys:

    {"keys": {"<sha256 hex of the key>": "alice", "<...>": "bob"},
     "tenants": {"alice": {"max_in_flight_requests": 8, "max_queued_jobs": 100}},
     "default_limits": {"max_in_flight_requests": 0, "max_queued_jobs": 0}}

Clients send `authorization: Bearer <key>`. A missing or unknown key is UNAUTHENTICATED; the
digest is compared against every stored digest in constant time and the key is never logged.
With `--tenant-from-client-cert` (mTLS) a call without a key is the tenant its client
certificate's common name names. Health is always open; reflection unless
`--reflection-requires-auth`. The interceptor also takes the tenant's in-flight slot
(server.tenants) around Generate and GenerateStream.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from tokenrelay_server import call_context
from tokenrelay_server.errors import Unauthenticated, abort
from tokenrelay_server.interceptors import metadata_value, wrap_handler
from tokenrelay_server.tenants import TenantLimiter, TenantLimits

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
INTERACTIVE_METHODS = frozenset({"/tokenrelay.v1.TextGenerationService/Generate",
                                 "/tokenrelay.v1.TextGenerationService/GenerateStream"})
_BEARER = "bearer "
_MAX_KEY_CHARS = 4096


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of an API key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _limits(raw: Any, where: str) -> TenantLimits:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object of limits")
    unknown = set(raw) - {"max_in_flight_requests", "max_queued_jobs"}
    if unknown:
        raise ValueError(f"{where}: unknown limits {sorted(unknown)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        raise ValueError(f"{where}: limits must be integers")
    return TenantLimits(**raw)


@dataclass(slots=True, frozen=True)
class ApiKeys:
    digests: tuple[tuple[bytes, str], ...]  # (SHA-256 digest, tenant)
    tenants: dict[str, TenantLimits] = field(default_factory=dict)
    default_limits: TenantLimits = field(default_factory=TenantLimits)

    @classmethod
    def load(cls, path: str) -> ApiKeys:
        """Parse the keys file; raises ValueError (with the reason, never a key) when malformed."""
        with open(path, encoding="utf-8") as handle:
            try:
                raw = json.load(handle)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not JSON: {exc.msg} at line {exc.lineno}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("keys"), dict):
            raise ValueError(f"{path}: expected an object with a \"keys\" object (digest -> tenant)")
        unknown = set(raw) - {"keys", "tenants", "default_limits"}
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
        digests = []
        for digest, tenant in raw["keys"].items():
            try:
                value = bytes.fromhex(digest)
            except ValueError:
                value = b""
            if len(value) != 32:
                raise ValueError(f"{path}: keys must be SHA-256 hex digests (64 hex digits)")
            if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
                raise ValueError(f"{path}: each key must name a tenant (1-128 characters)")
            digests.append((value, tenant))
        tenants = {name: _limits(limits, f"{path}: tenants.{name}")
                   for name, limits in (raw.get("tenants") or {}).items()}
        default = _limits(raw.get("default_limits") or {}, f"{path}: default_limits")
        return cls(tuple(digests), tenants, default)

    def tenant_for(self, key: str) -> str | None:
        """The tenant of `key`, or None. Compares against every digest in constant time."""
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        found = None
        for stored, tenant in self.digests:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default_limits)


@dataclass(slots=True, frozen=True)
class AuthConfig:
    api_keys_file: str = ""
    tenant_from_client_cert: bool = False  # mTLS: the client certificate's CN names the tenant
    reflection_requires_auth: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_file) or self.tenant_from_client_cert


class Authenticator:
    """Resolves a call's tenant from its metadata and peer certificate. Reloadable keys."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.keys = ApiKeys.load(config.api_keys_file) if config.api_keys_file else ApiKeys(())

    def reload(self) -> None:
        """Re-read the keys file; on error keep the keys in force (and say why)."""
        if not self.config.api_keys_file:
            return
        try:
            self.keys = ApiKeys.load(self.config.api_keys_file)
        except (OSError, ValueError) as exc:
            log.error("API keys not reloaded, keeping the previous ones: %s", exc)
            return
        log.info("API keys reloaded: %d keys", len(self.keys.digests))

    def needs_auth(self, method: str) -> bool:
        if method.startswith(HEALTH_PREFIX):
            return False
        if method.startswith(REFLECTION_PREFIXES):
            return self.config.reflection_requires_auth
        return True

    def identify(self, metadata: Any, context: grpc.aio.ServicerContext) -> tuple[str, TenantLimits]:
        """(tenant, limits) of the caller; raises Unauthenticated."""
        header = metadata_value(metadata, "authorization")
        if header:
            if not header[:len(_BEARER)].lower() == _BEARER or len(header) > _MAX_KEY_CHARS:
                raise Unauthenticated("authorization metadata must be 'Bearer <API key>'")
            tenant = self.keys.tenant_for(header[len(_BEARER):].strip())
            if tenant is None:
                raise Unauthenticated("unknown API key")
            return tenant, self.keys.limits_for(tenant)
        if self.config.tenant_from_client_cert:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            if names:
                tenant = names[0].decode("utf-8", "replace")
                return tenant, self.keys.limits_for(tenant)
            raise Unauthenticated("no API key and no client certificate")
        raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health (and reflection unless configured), binds the
    tenant to the call, and holds the tenant's in-flight slot around interactive calls."""

    def __init__(self, authenticator: Authenticator, limiter: TenantLimiter) -> None:
        self._auth = authenticator
        self._limiter = limiter

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if not self._auth.needs_auth(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        interactive = method in INTERACTIVE_METHODS

        @contextlib.asynccontextmanager
        async def around(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            info, token = call_context.enter(method)
            try:
                try:
                    info.tenant, info.limits = self._auth.identify(metadata, context)
                    slot = self._limiter.acquire(info.tenant, info.limits) if interactive else None
                except Unauthenticated as exc:
                    log.info("unauthenticated call to %s: %s", method, exc.message)
                    await abort(context, exc)
                except Exception as exc:  # noqa: BLE001 - a quota refusal
                    await abort(context, exc)
                try:
                    yield
                finally:
                    if slot is not None:
                        slot.release()
            finally:
                call_context.leave(token)

        return wrap_handler(handler, around)
