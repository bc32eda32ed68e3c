"""Errors a client can cause, answered as JSON OperationOutcome bodies (never a 5xx for client input)."""
from __future__ import annotations


RETRY_AFTER_SECONDS = 5  # told to a client answered 503 (a part the service needs cannot be reached)


class ServiceError(Exception):
    status = 400
    code = "invalid"  # FHIR issue type

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(ServiceError):
    status, code = 400, "invalid"


class Unauthorized(ServiceError):
    status, code = 401, "login"


class NotFound(ServiceError):
    status, code = 404, "not-found"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "not-supported"


class PreconditionFailed(ServiceError):
    """CDS Hooks 2.0: the data the rules need could be had neither from prefetch nor from the FHIR server."""

    status, code = 412, "processing"


def store_failure(exc: BaseException) -> str:
    """A database failure in words safe to log: its type and SQLSTATE, never its message (a driver's message
    can quote the statement's parameters)."""
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return type(exc).__name__ + (f", SQLSTATE {state}" if state else "")


def operation_outcome(message: str, code: str = "invalid", field: str | None = None, severity: str = "error") -> dict:
    issue = {"severity": severity, "code": code, "details": {"text": message}}
    if field:
        issue["expression"] = [field]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_response(status: int, message: str, code: str = "invalid", field: str | None = None):
    from flask import jsonify  # here: the clinical core and the pharmacists' commands raise these without Flask

    response = jsonify(operation_outcome(message, code, field))
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
