"""EdgeFit settings, read from the environment through config.env.

Unset variables give the embedded single-machine defaults: SQLite in ./var, a Celery broker
on SQLite through kombu's SQLAlchemy transport (no server), task results in the database, a
file cache in ./var/cache.  Set DATABASE_URL / CELERY_BROKER_URL / REDIS_URL for the real stack, and
EDGEFIT_PRODUCTION=true to make every secret mandatory.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_float, env_int, env_list, env_str, env_url
from config.openapi import APPEND_COMPONENTS as DELIVERY_COMPONENTS
from config.openapi import APPEND_PATHS as DELIVERY_PATHS

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("EDGEFIT_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

PRODUCTION = env_bool("EDGEFIT_PRODUCTION", False)


def _embedded_secret(filename: str, nbytes: int) -> str:
    """A secret kept in ./var for the embedded default, created once; never used in production."""
    path = VAR_DIR / filename
    if not path.exists():
        path.write_text(secrets.token_hex(nbytes))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = env_str("DJANGO_SECRET_KEY", required=PRODUCTION) or _embedded_secret("secret_key", 32)
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list(
    "DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"], required=PRODUCTION
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# Ed25519 seed (64 hex characters) that signs package manifests.
SIGNING_KEY_HEX = env_str("EDGEFIT_SIGNING_KEY", required=PRODUCTION) or _embedded_secret("signing_key", 32)
if len(SIGNING_KEY_HEX) != 64 or any(c not in "0123456789abcdefABCDEF" for c in SIGNING_KEY_HEX):
    raise ImproperlyConfigured(
        "EDGEFIT_SIGNING_KEY must be 64 hexadecimal characters (a 32-byte Ed25519 seed)"
    )

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "accounts",
    "devices",
    "registry",
]

MIDDLEWARE = [
    "config.middleware.DevicePathMiddleware",  # device config + ping: nothing below runs for them
    "django.middleware.security.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",  # async under ASGI (WhiteNoise is WSGI-only)
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.roles",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
DATABASE_URL = env_url(
    "DATABASE_URL",
    f"sqlite:///{VAR_DIR / 'edgefit.sqlite3'}",
    schemes=("sqlite", "postgres", "postgresql", "pgsql"),
)
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60, minimum=0))
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A web process and a worker share the file: wait for locks instead of failing, and take
    # the write lock at BEGIN so two writers never deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache ----------------------------------------------------------------------------------
REDIS_URL = env_url("REDIS_URL", "", schemes=("redis", "rediss", "unix"))
CACHE_TIMEOUT_S = env_float("EDGEFIT_CACHE_TIMEOUT_S", 2.0, minimum=0.05)
if REDIS_URL:
    CACHES: dict[str, dict[str, Any]] = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "edgefit",
            # Without timeouts a blackholed Redis (a network blip dropping packets) holds a request
            # until the OS gives up, minutes later; with them the cache read fails fast and the
            # device paths answer from the database (devices.hotpath's unreachable-cache mode).
            "OPTIONS": {
                "socket_connect_timeout": CACHE_TIMEOUT_S,
                "socket_timeout": CACHE_TIMEOUT_S,
            },
        }
    }
else:
    # A file cache, not local memory: the web processes and the worker must see the same
    # entries (the device config path is served from the cache and invalidated by whichever
    # process commits a change).
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
            "KEY_PREFIX": "edgefit",
            "OPTIONS": {"MAX_ENTRIES": 100_000},
        }
    }

# --- celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = env_url(
    "CELERY_BROKER_URL",
    f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}",
    schemes=("redis", "rediss", "amqp", "pyamqp", "sqla+sqlite", "sqla+postgresql", "memory"),
    required=PRODUCTION,
)
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# The longest job (a fleet planning run) takes minutes; limits and the broker's visibility
# timeout sit far above it so a healthy run is never cut or re-delivered while it works.
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 4 * 3600, minimum=60)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 30
# (Only Redis understands visibility_timeout; the SQLAlchemy transport hands its options to
# create_engine, which rejects unknown ones.)
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {"visibility_timeout": CELERY_TASK_TIME_LIMIT + 3600}
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
    else {}
)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# --- auth and API ---------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:overview"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.permissions.StaffWriteViewerRead"],
    # DRF's three, with a JSON parser that refuses absurd nesting (400, not a RecursionError).
    "DEFAULT_PARSER_CLASSES": [
        "config.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
        "rest_framework.filters.SearchFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "config.pagination.StandardPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "config.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "EdgeFit API",
    "DESCRIPTION": "Device profiles, models, variants, planning runs, packages and releases.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # The delivery endpoints that are plain Django views (config/openapi.py).
    "APPEND_PATHS": DELIVERY_PATHS,
    "APPEND_COMPONENTS": DELIVERY_COMPONENTS,
}

# --- static files ---------------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}
SERVESTATIC_USE_FINDERS = True  # serve plotly.js straight from the package too

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# HTTPS: on by default in production (served over TLS, directly or by a TLS-terminating proxy
# in front); EDGEFIT_HTTPS=false only for a plain-HTTP stack on localhost (the compose demo).
# With it, cookies are Secure, plain-HTTP requests are redirected (health checks excepted) and
# browsers are told to keep to HTTPS (HSTS).  A proxy that terminates TLS must set
# X-Forwarded-Proto, and EDGEFIT_TRUST_X_FORWARDED_PROTO=true lets Django believe it (never set
# it without such a proxy: a client could then claim HTTPS itself).
HTTPS = env_bool("EDGEFIT_HTTPS", PRODUCTION)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^health/$"]
SECURE_HSTS_SECONDS = env_int("EDGEFIT_HSTS_SECONDS", 31_536_000, minimum=0) if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("EDGEFIT_HSTS_INCLUDE_SUBDOMAINS", False)
if env_bool("EDGEFIT_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("EDGEFIT_LOG_LEVEL", "INFO")},
}

STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "config.staticfinders.PlotlyFinder",
]

# Engine caches (trained exit heads, quantized weights, per-plan outputs) and packages.
ENGINE_DATA_DIR = Path(env_str("EDGEFIT_DATA_DIR", str(VAR_DIR / "engine"))).resolve()

# Planning work whose worker has not sent a heartbeat for this long is taken over.
EDGEFIT_STALE_SECONDS = env_int("EDGEFIT_STALE_SECONDS", 120, minimum=2)
CELERY_TASK_DEFAULT_QUEUE = env_str("EDGEFIT_TASK_QUEUE", "celery")
CELERY_BEAT_SCHEDULE = {
    "requeue-stale-planning-work": {
        "task": "workers.requeue_stale",
        "schedule": float(env_int("EDGEFIT_REQUEUE_SECONDS", 60, minimum=1)),
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# SQLAlchemy URL of Optuna's RDB storage; empty = the project database itself.
OPTUNA_STORAGE_URL = env_str("EDGEFIT_OPTUNA_STORAGE_URL", "")

# --- delivery (packages, device config) -------------------------------------------------------
# Packages are stored content-addressed: <EDGEFIT_PACKAGE_DIR>/<digest>/{manifest.json,…}.
PACKAGE_DIR = Path(env_str("EDGEFIT_PACKAGE_DIR", str(VAR_DIR / "packages"))).resolve()
# Requests per device token per window on the device endpoints (429 + Retry-After beyond).
# A device polls every EDGEFIT_POLL_INTERVAL_S ± EDGEFIT_POLL_JITTER_S; load tests raise the limit.
EDGEFIT_DEVICE_RATE_LIMIT = env_int("EDGEFIT_DEVICE_RATE_LIMIT", 60, minimum=1)
EDGEFIT_DEVICE_RATE_WINDOW_S = env_int("EDGEFIT_DEVICE_RATE_WINDOW_S", 60, minimum=1, maximum=86_400)
EDGEFIT_POLL_INTERVAL_S = env_int("EDGEFIT_POLL_INTERVAL_S", 300, minimum=1)
EDGEFIT_POLL_JITTER_S = env_int("EDGEFIT_POLL_JITTER_S", 60, minimum=0)
