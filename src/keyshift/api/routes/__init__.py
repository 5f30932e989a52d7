"""Every router of the API, in one list the app factory includes."""

from fastapi import APIRouter

from keyshift.api.routes import audit, health, tokens

ROUTERS: list[APIRouter] = [health.router, tokens.router, audit.router]
