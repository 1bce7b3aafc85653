"""The Alertmanager webhook payload, version 4, as typed models.

Alertmanager documents the body of ``webhook_configs`` as version 4; any other version is
refused. While an alert fires its ``endsAt`` is the zero time ``0001-01-01T00:00:00Z``, which
is read as "not ended" (``None``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_LABELS = 256
MAX_TEXT = 65_536


def _zero_time_is_none(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("0001-01-01"):
        return None
    return value


Time = Annotated[datetime | None, BeforeValidator(_zero_time_is_none)]
LabelSet = Annotated[
    dict[Annotated[str, Field(max_length=1024)], Annotated[str, Field(max_length=MAX_TEXT)]],
    Field(max_length=MAX_LABELS),
]
Status = Literal["firing", "resolved"]


class _Payload(BaseModel):
    # Unknown keys are kept out of the model but accepted: Alertmanager may add fields.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Alert(_Payload):
    """One alert of a notification."""

    status: Status
    labels: LabelSet
    annotations: LabelSet = {}
    starts_at: Time = Field(default=None, alias="startsAt")
    ends_at: Time = Field(default=None, alias="endsAt")
    generator_url: Annotated[str, Field(max_length=MAX_TEXT)] = Field(
        default="", alias="generatorURL"
    )
    fingerprint: Annotated[str, Field(max_length=256)] = ""

    @property
    def name(self) -> str:
        """The ``alertname`` label, or an empty string."""
        return self.labels.get("alertname", "")


class Notification(_Payload):
    """One webhook body: a group of alerts sent to one receiver."""

    version: Literal["4"]
    group_key: Annotated[str, Field(max_length=MAX_TEXT)] = Field(alias="groupKey")
    truncated_alerts: Annotated[int, Field(ge=0)] = Field(default=0, alias="truncatedAlerts")
    status: Status
    receiver: Annotated[str, Field(max_length=1024)]
    group_labels: LabelSet = Field(default={}, alias="groupLabels")
    common_labels: LabelSet = Field(default={}, alias="commonLabels")
    common_annotations: LabelSet = Field(default={}, alias="commonAnnotations")
    external_url: Annotated[str, Field(max_length=MAX_TEXT)] = Field(
        default="", alias="externalURL"
    )
    alerts: list[Alert]

    @property
    def firing(self) -> list[Alert]:
        return [alert for alert in self.alerts if alert.status == "firing"]

    @property
    def resolved(self) -> list[Alert]:
        return [alert for alert in self.alerts if alert.status == "resolved"]

    def to_json(self) -> str:
        """The payload as Alertmanager's JSON field names, for storage in the outbox."""
        return self.model_dump_json(by_alias=True)
