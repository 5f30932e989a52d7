"""The notices' error words; the API and CLI map them like every KeyshiftError."""

from __future__ import annotations

from keyshift.errors import Conflict, InvalidInput, NotFound


class TemplateInvalid(InvalidInput):
    """A template names a variable its kind does not have, or has a malformed placeholder."""

    code = "invalid_template"


class EndpointInvalid(InvalidInput):
    """A webhook endpoint URL or secret that cannot be used."""

    code = "invalid_endpoint"


class NoticeNotFound(NotFound):
    code = "notice_not_found"


class NotReplayable(Conflict):
    """Only a dead (or delivered) notice is sent again by a replay."""

    code = "notice_not_replayable"
