"""Every router of the API, in one list the app factory includes."""

from fastapi import APIRouter

from keyshift.api.routes import (
    accounts,
    audit,
    catalog,
    health,
    licenses,
    migrations,
    notices,
    runs,
    tokens,
    usage,
    validation,
)

ROUTERS: list[APIRouter] = [
    health.router,
    validation.router,
    catalog.router,
    accounts.router,
    licenses.router,
    tokens.router,
    audit.router,
    usage.router,
    migrations.router,
    runs.router,
    notices.router,
]
