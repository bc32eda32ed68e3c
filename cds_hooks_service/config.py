"""Configuration, read once from environment variables (all listed in the README)."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .facts import parse_time
from .limits import Limits
from .auth import check_public_url
from .fhir_servers import parse_networks, parse_server_list

REPO_ROOT = Path(__file__).resolve().parent.parent


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc


def _positive_int(name: str, default: int) -> int:
    value = _float(name, default)
    if value < 1 or value != int(value):
        raise ValueError(f"{name} must be a whole number of at least 1, got {os.environ.get(name)!r}")
    return int(value)


def _readable_file(name: str) -> str | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{name} must name a readable file, got {value!r}")
    return value


@dataclass
class Settings:
    rules_dir: Path = REPO_ROOT / "rules"
    cards_dir: Path = REPO_ROOT / "cards"
    rules_local_dir: Path | None = None
    rules_poll_seconds: float = 2.0  # how often a running service checks the rule files for changes; 0: SIGHUP only
    rules_load_timeout: float = 30.0  # the gunicorn master gives up a rule load after this long (0: no limit)
    database_url: str = ""
    jwt_issuers_file: Path | None = None
    public_url: str | None = None
    max_body_bytes: int = 5 * 1024 * 1024
    time_budget: float = 1.5  # seconds for all FHIR fallback queries of one hook call
    fhir_connect_timeout: float = 0.5
    fhir_read_timeout: float = 1.0
    cors_origins: str = "*"
    suppression_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    fixed_now: datetime | None = None  # demos and tests only
    debug_trace: bool = False
    instance_dir: Path = REPO_ROOT / "instance"
    admin_token: str | None = None  # GET /admin (rule performance page); unset = page disabled
    metrics_token: str | None = None  # GET /metrics needs it as a Bearer token; unset = open
    limits: Limits = field(default_factory=Limits)  # per-request bounds (CDS_MAX_DRAFTS, ... see limits.py)
    fhir_servers: tuple[str, ...] = ()  # open mode: the FHIR base URLs a request may name (CDS_FHIR_SERVERS)
    fhir_private_networks: tuple = ()  # CIDRs a FHIR server's address may be in (CDS_FHIR_PRIVATE_NETWORKS)
    fhir_ca_bundle: str | None = None  # CA certificates (PEM file) for the FHIR servers; unset: certifi's bundle
    fhir_max_concurrency: int = 16  # FHIR reads running at once per process (CDS_FHIR_MAX_CONCURRENCY)
    jwt_max_lifetime: float = 300.0  # a JWT's exp may be at most this many seconds after its iat

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        instance_dir = Path(env.get("CDS_INSTANCE_DIR") or REPO_ROOT / "instance")
        rules_dir = Path(env.get("CDS_RULES_DIR") or REPO_ROOT / "rules")
        fixed_now = None
        if env.get("CDS_FIXED_NOW"):
            fixed_now = parse_time(env["CDS_FIXED_NOW"])
            if fixed_now is None:
                raise ValueError(f"CDS_FIXED_NOW is not an ISO date-time: {env['CDS_FIXED_NOW']!r}")
        from .cards import display_zone
        display_zone()  # CDS_DISPLAY_TIMEZONE: an unknown zone stops the service at start
        settings = cls(
            rules_dir=rules_dir,
            cards_dir=Path(env.get("CDS_CARDS_DIR") or rules_dir.parent / "cards"),
            rules_local_dir=Path(env["CDS_RULES_LOCAL_DIR"]) if env.get("CDS_RULES_LOCAL_DIR") else None,
            rules_poll_seconds=_float("CDS_RULES_POLL_SECONDS", 2.0),
            rules_load_timeout=_float("CDS_RULES_LOAD_TIMEOUT", 30.0),
            database_url=env.get("DATABASE_URL") or f"sqlite:///{instance_dir / 'cds-hooks.sqlite3'}",
            jwt_issuers_file=Path(env["CDS_JWT_ISSUERS"]) if env.get("CDS_JWT_ISSUERS") else None,
            public_url=(env.get("CDS_PUBLIC_URL") or None),
            max_body_bytes=int(_float("CDS_MAX_BODY_BYTES", 5 * 1024 * 1024)),
            time_budget=_float("CDS_TIME_BUDGET", 1.5),
            fhir_connect_timeout=_float("CDS_FHIR_CONNECT_TIMEOUT", 0.5),
            fhir_read_timeout=_float("CDS_FHIR_READ_TIMEOUT", 1.0),
            cors_origins=env.get("CDS_CORS_ORIGINS", "*"),
            suppression_secret=_secret(env.get("CDS_SUPPRESSION_SECRET"), instance_dir),
            fixed_now=fixed_now,
            debug_trace=env.get("CDS_DEBUG_TRACE", "").lower() in ("1", "true", "yes"),
            instance_dir=instance_dir,
            admin_token=(env.get("CDS_ADMIN_TOKEN") or None),
            metrics_token=(env.get("CDS_METRICS_TOKEN") or None),
            limits=Limits.from_env(env),
            fhir_servers=parse_server_list(env.get("CDS_FHIR_SERVERS")),
            fhir_private_networks=parse_networks(env.get("CDS_FHIR_PRIVATE_NETWORKS")),
            fhir_ca_bundle=_readable_file("CDS_FHIR_CA_BUNDLE"),
            fhir_max_concurrency=_positive_int("CDS_FHIR_MAX_CONCURRENCY", 16),
            jwt_max_lifetime=_float("CDS_JWT_MAX_LIFETIME", 300.0),
        )
        for key, value in overrides.items():
            setattr(settings, key, value)
        if settings.jwt_issuers_file:  # JWT mode: aud is checked against CDS_PUBLIC_URL, never the Host header
            check_public_url(settings.public_url)
        return settings


def _secret(value: str | None, instance_dir: Path) -> bytes:
    """Key for the one-way suppression keys. Instances sharing a database must share it (set the env var)."""
    if value:
        return value.encode()
    path = instance_dir / "suppression.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        instance_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key
    except OSError:
        return secrets.token_bytes(32)
