"""Configuration, read once from environment variables (all listed in the README)."""
from __future__ import annotations

import ipaddress
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
APP_NAME = "cds-hooks-service"


_PACKAGED = {"rules": "rules", "cards": "cards", "fhir_examples": "fhir_examples",
             "gunicorn.conf.py": "server_config/gunicorn.conf.py"}


def shipped_dir(name: str) -> Path:
    """The shipped ``rules``, ``cards``, ``fhir_examples`` or ``gunicorn.conf.py``: package data in an installed wheel (the build maps
    them into the package, see pyproject.toml), the top-level file or folder in a source checkout."""
    packaged = Path(__file__).resolve().parent / _PACKAGED[name]
    return packaged if packaged.exists() else REPO_ROOT / name


def default_instance_dir() -> Path:
    """Local state (SQLite file, generated key): CDS_INSTANCE_DIR, else the user's data directory."""
    from platformdirs import user_data_path

    return Path(os.environ.get("CDS_INSTANCE_DIR") or user_data_path(APP_NAME, appauthor=False))
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"  # the public CDS Hooks Sandbox (a browser client)
MIN_TOKEN_LENGTH = 32  # CDS_ADMIN_TOKEN, CDS_METRICS_TOKEN


class ConfigError(ValueError):
    """A setting the service refuses to start with; the message is one line naming the fix."""


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
    rules_dir: Path = field(default_factory=lambda: shipped_dir("rules"))
    cards_dir: Path = field(default_factory=lambda: shipped_dir("cards"))
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
    cors_origins: str = SANDBOX_ORIGIN  # comma-separated; "*" only in open mode
    suppression_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    fixed_now: datetime | None = None  # demos and tests only
    debug_trace: bool = False
    instance_dir: Path = field(default_factory=default_instance_dir)
    admin_token: str | None = None  # GET /admin (rule performance page); unset = page disabled
    metrics_token: str | None = None  # GET /metrics needs it as a Bearer token; unset = loopback clients only
    # Where the service listens (hosts of the bound addresses; set by serving.py from the server's real bind,
    # CDS_LISTEN_HOSTS under another WSGI server). Empty = unknown, treated as reachable from the network.
    listen_hosts: tuple[str, ...] = ()
    allow_open_mode: bool = False  # CDS_ALLOW_OPEN_MODE=1: open mode (no JWT) also off loopback
    require_jwt: bool = False  # CDS_REQUIRE_JWT=1 (the Procfile): refuse to start without CDS_JWT_ISSUERS
    body_timeout: float = 10.0  # seconds from the request's start for its whole body to arrive (then 408)
    limits: Limits = field(default_factory=Limits)  # per-request bounds (CDS_MAX_DRAFTS, ... see limits.py)
    fhir_servers: tuple[str, ...] = ()  # open mode: the FHIR base URLs a request may name (CDS_FHIR_SERVERS)
    fhir_private_networks: tuple = ()  # CIDRs a FHIR server's address may be in (CDS_FHIR_PRIVATE_NETWORKS)
    fhir_ca_bundle: str | None = None  # CA certificates (PEM file) for the FHIR servers; unset: certifi's bundle
    fhir_max_concurrency: int = 16  # FHIR reads running at once per process (CDS_FHIR_MAX_CONCURRENCY)
    jwt_max_lifetime: float = 300.0  # a JWT's exp may be at most this many seconds after its iat

    @property
    def open_mode(self) -> bool:
        return self.jwt_issuers_file is None

    @property
    def loopback_only(self) -> bool:
        """True when every address the service listens on is a loopback address."""
        return bool(self.listen_hosts) and all(is_loopback_host(h) for h in self.listen_hosts)

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.replace(",", " ").split() if o.strip()]

    def startup_problem(self) -> str | None:
        """The first reason this configuration must not serve (one line), or None."""
        where = ", ".join(self.listen_hosts) or "an address not known to the service (set CDS_LISTEN_HOSTS)"
        if self.require_jwt and self.open_mode:
            return ("CDS_JWT_ISSUERS is required here (CDS_REQUIRE_JWT=1, as under the Procfile): "
                    "set it to the JSON file of trusted issuers")
        if self.open_mode and not self.loopback_only and not self.allow_open_mode:
            return (f"open mode (CDS_JWT_ISSUERS unset: calls without a JWT are accepted) is allowed on loopback "
                    f"only, but the service listens on {where}: set CDS_JWT_ISSUERS, listen on 127.0.0.1, "
                    f"or set CDS_ALLOW_OPEN_MODE=1")
        if "*" in self.cors_origin_list() and not self.open_mode:
            return ("CDS_CORS_ORIGINS='*' is allowed in open mode only: list the browser origins that may call "
                    f"the service (the CDS Hooks Sandbox is {SANDBOX_ORIGIN})")
        for name, token in (("CDS_ADMIN_TOKEN", self.admin_token), ("CDS_METRICS_TOKEN", self.metrics_token)):
            if token is not None and len(token) < MIN_TOKEN_LENGTH:
                return (f"{name} is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH} "
                        f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if self.body_timeout <= 0:
            return f"CDS_BODY_TIMEOUT must be a positive number of seconds, got {self.body_timeout}"
        return None

    def check(self) -> "Settings":
        problem = self.startup_problem()
        if problem:
            raise ConfigError(problem)
        return self

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        instance_dir = default_instance_dir()
        rules_dir = Path(env["CDS_RULES_DIR"]) if env.get("CDS_RULES_DIR") else shipped_dir("rules")
        fixed_now = None
        if env.get("CDS_FIXED_NOW"):
            fixed_now = parse_time(env["CDS_FIXED_NOW"])
            if fixed_now is None:
                raise ValueError(f"CDS_FIXED_NOW is not an ISO date-time: {env['CDS_FIXED_NOW']!r}")
        from .cards import display_zone
        display_zone()  # CDS_DISPLAY_TIMEZONE: an unknown zone stops the service at start
        settings = cls(
            rules_dir=rules_dir,
            cards_dir=Path(env.get("CDS_CARDS_DIR") or (rules_dir.parent / "cards" if env.get("CDS_RULES_DIR")
                                                          else shipped_dir("cards"))),
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
            cors_origins=env.get("CDS_CORS_ORIGINS") or SANDBOX_ORIGIN,
            suppression_secret=_secret(env.get("CDS_SUPPRESSION_SECRET"), instance_dir),
            fixed_now=fixed_now,
            debug_trace=env.get("CDS_DEBUG_TRACE", "").lower() in ("1", "true", "yes"),
            instance_dir=instance_dir,
            admin_token=(env.get("CDS_ADMIN_TOKEN") or None),
            metrics_token=(env.get("CDS_METRICS_TOKEN") or None),
            limits=Limits.from_env(env),
            listen_hosts=tuple(h for h in env.get("CDS_LISTEN_HOSTS", "").replace(",", " ").split()),
            allow_open_mode=_flag("CDS_ALLOW_OPEN_MODE"),
            require_jwt=_flag("CDS_REQUIRE_JWT"),
            body_timeout=_float("CDS_BODY_TIMEOUT", 10.0),
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


def _flag(name: str) -> bool:
    value = (os.environ.get(name) or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {value!r}")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (an address the service listens on; brackets allowed)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
